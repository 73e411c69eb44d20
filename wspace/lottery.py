"""Lottery tickets by iterative magnitude pruning (IMP) with rewinding, and its controls.

IMP (Frankle & Carbin 2019, arXiv 1803.03635; rewinding to step ``k``:
Frankle et al. 2020, arXiv 1912.05671): train the dense network for ``T``
steps; then, for levels ``l = 1..L``, prune a fraction ``rate`` of the
surviving weights by magnitude (``layer_rates`` per layer, e.g. ``{"head":
0.1}``), rewind the survivors to their values at step ``k`` (``k = 0``: the
original initialisation) and retrain to step ``T``. After ``l`` levels the
density of a layer pruned at rate ``r`` is ``(1 - r)**l``.

Rewinding (`REWINDS`) puts the survivors back at their step-``k`` values and
continues from step ``k`` (same data order as the dense run from ``k`` on):

* ``"fresh"`` (default, as open_lth): a **new optimizer state**
  (``tx.init``: zero momentum, Adam moments and bias-correction count at 0),
  with the learning-rate schedule fast-forwarded to step ``k`` (every schedule
  counter copied from the step-``k`` state; `fresh_opt_state`). open_lth trains
  each level by ``train(..., start_step=k)``, which builds a new optimizer and
  steps its LR scheduler to ``k``.
* ``"restore"``: the whole training state at step ``k`` (momentum/Adam moments
  of the dense run at ``k`` included), a named variant.

With ``k = 0`` both are the initial state.

Arms (`ARMS`):

* ``rewind``: the ticket, as above (``k = 0`` is rewind-to-init).
* ``reinit``: the ticket's masks (``reference``), fresh random weights from
  ``init_fn``, trained from step 0 (the random re-initialisation control).
* ``random``: random masks with the ticket's per-layer counts (`shuffle_masks`
  of ``reference``; without one, layerwise random pruning at the level's
  rates), rewound weights.
* ``oneshot``: the dense solution pruned in one shot to level ``l``'s sparsity,
  rewound, retrained.

Training goes through a ``train(state, masks, num_steps, seed=None) -> (state,
metrics)`` callable: `Trainer` builds one on `wspace.training.make_train_step`
and `wspace.training.fit` (``mode``/``mesh``: jit, sharded or pmap). Its optax
chain, built without masks, should start with `wspace.pruning.mask_gradients`
and must end with `wspace.pruning.keep_masked`; the trainer puts each level's
masks into their states (`wspace.pruning.set_masks`), so masks change between
levels without recompiling.

Seeds as an axis: with ``Trainer(..., seed=[s0, s1, ...])`` and a state from
`wspace.training.init_states`, everything carries a leading seed axis (states,
params, masks; ``key`` of the ``reinit``/``random`` arms is one key per seed) and
S seeds of IMP run as one program: one train step ``vmap``-ed over the seeds,
magnitude pruning per seed (``vmap`` of `wspace.pruning.magnitude_masks`), one
checkpoint per level holding every seed. Metrics are then lists, one per seed.
A seed trained among S gives what it gives alone (to floating-point tolerance).

Per level, `run_arm` can also measure **instability** (Frankle et al. 2020,
Algorithm 1 with two copies): a second copy is trained from the level's start
state with another data order, and the barrier of ``instability_eval`` (e.g.
the test error) on the line between the two copies is recorded.

Every level's params, masks and metrics are saved under ``workdir`` (orbax +
atomic JSON, the JSON last); a rerun resumes at the first unfinished level.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace import io, landscape, pruning
from wspace import training as training_lib

PyTree = Any
ARMS = ("rewind", "reinit", "random", "oneshot")
REWINDS = ("fresh", "restore")
_SCHEDULE_STATES = (
    optax.ScaleByScheduleState,
    optax.InjectHyperparamsState,
    optax.InjectStatefulHyperparamsState,
)


class DenseRun(NamedTuple):
    """The dense run that every arm starts from: train states at steps 0, ``k`` and ``T``."""

    init: training_lib.TrainState
    rewind: training_lib.TrainState
    final: training_lib.TrainState
    metrics: dict
    rewind_step: int

    @property
    def num_steps(self) -> int:
        return _step_of(self.final)

    def rewound_to(self, step: int) -> DenseRun:
        """This run with its rewind point moved to ``0`` (the init) or its own ``k``."""
        if step == 0:
            return self._replace(rewind=self.init, rewind_step=0)
        if step == self.rewind_step:
            return self
        raise ValueError(
            f"this dense run saved steps 0 and {self.rewind_step}; cannot rewind to {step}"
        )


class Level(NamedTuple):
    """One IMP level: trained ``params`` and ``model_state``, its ``masks`` and ``metrics``."""

    level: int
    params: PyTree
    model_state: PyTree
    masks: PyTree
    metrics: dict


def _has_seed_axis(state: training_lib.TrainState) -> bool:
    return np.ndim(state.step) == 1


def _over_seeds(fn: Callable, seed_axis: bool) -> Callable:
    """``fn``, or ``fn`` mapped over the leading seed axis of every argument."""
    return jax.vmap(fn) if seed_axis else fn


def _seedwise(fn: Callable, seed_axis: bool) -> Callable:
    """``fn(tree, *args, masks=, key=, **kwargs)`` mapped over the seed axis of ``tree`` and
    of the ``masks``/``key`` keywords; the other arguments are shared by all seeds."""
    if not seed_axis:
        return fn

    def mapped(tree, *args, **kwargs):
        per = {k: kwargs.pop(k) for k in ("masks", "key") if kwargs.get(k) is not None}
        return jax.vmap(lambda t, p: fn(t, *args, **kwargs, **p))(tree, per)

    return mapped


def _step_of(state: training_lib.TrainState) -> int:
    return int(np.ravel(state.step)[0])


def all_true(params: PyTree) -> PyTree:
    """The dense mask: ``True`` everywhere, shaped like ``params``."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def level_rate(rate: float, level: int) -> float:
    """Fraction pruned after ``level`` rounds at ``rate``: ``1 - (1 - rate)**level``."""
    return 1.0 - (1.0 - rate) ** level


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """``train(state, masks, num_steps, seed=None) -> (state, metrics)`` on `wspace.training.fit`.

    Binds the loss, the optax chain, the data and the devices once. A call
    trains from ``state.step`` to ``num_steps`` (the data order continues where
    ``state.step`` is, so a state rewound to step ``k`` sees the batches the
    dense run saw after ``k``; ``seed`` replaces the data-order seed(s), e.g. for
    the second copy of an instability measurement) with ``masks`` in the optimizer
    state (`wspace.pruning.set_masks`, taken out again in the returned state), and
    evaluates once at the end (``train_/test_ loss/accuracy``).

    Args:
      loss_fn: the library's loss signature (`wspace.training.classification_loss`).
      tx: the optax chain, built without masks; start it with
        `wspace.pruning.mask_gradients` and end it with `wspace.pruning.keep_masked`.
      dataset: a `wspace.data.Dataset`.
      apply_fn: ``model.apply``, for evaluation.
      batch_size: global batch size.
      seed: data-order seed, or a list of seeds: then states carry a leading seed axis
        (`wspace.training.init_states`), the step is built with ``seed_axis=True`` and
        metrics are lists, one per seed.
      mode, mesh: ``jit`` | ``sharded`` | ``pmap`` and the mesh (`wspace.training.MODES`).
      estimator: gradient estimator with the shape of `jax.value_and_grad`.
      writer: a metric writer (`wspace.io`, e.g. ``TensorBoardWriter``) that gets each
        call's record (`wspace.training.fit`'s ``writer``; the caller closes it).
    """

    loss_fn: Callable
    tx: optax.GradientTransformation
    dataset: Any
    apply_fn: Callable
    batch_size: int
    seed: int | Sequence[int] = 0
    mode: str = "jit"
    mesh: Any = None
    estimator: Callable = jax.value_and_grad
    writer: Any = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int | np.integer) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        step = training_lib.make_train_step(
            self.loss_fn, self.tx, estimator=self.estimator, mode=self.mode, mesh=self.mesh,
            seed_axis=not isinstance(self.seed, int | np.integer),
        )  # fmt: skip
        object.__setattr__(self, "train_step", step)

    def with_seed(self, seed: int | Sequence[int]) -> Trainer:
        """This trainer with other data-order seed(s) (an int, or a list for a seed axis)."""
        return dataclasses.replace(self, seed=seed)

    def __call__(self, state, masks, num_steps, *, seed: int | Sequence[int] | None = None):
        if int(num_steps) <= _step_of(state):
            raise ValueError(f"state is at step {_step_of(state)}; cannot train to {num_steps}")
        masked = state.replace(opt_state=pruning.set_masks(state.opt_state, masks))
        state, history = training_lib.fit(
            masked,
            self.train_step,  # type: ignore[attr-defined]  # set in __post_init__ (frozen)
            self.dataset,
            apply_fn=self.apply_fn,
            num_steps=int(num_steps),
            batch_size=self.batch_size,
            seed=self.seed if seed is None else seed,
            mode=self.mode,
            mesh=self.mesh,
            eval_every=int(num_steps),
            writer=self.writer,
            progress=False,
        )
        skip = ("step", "time")
        metrics = {k: v for k, v in history[-1].items() if k not in skip and "batch_" not in k}
        return state.replace(opt_state=pruning.set_masks(state.opt_state, None)), metrics


def fresh_opt_state(
    tx: optax.GradientTransformation, params: PyTree, rewound: PyTree, *, seed_axis: bool = False
) -> PyTree:
    """A new optimizer state for ``params`` with its learning-rate schedule at ``rewound``'s step.

    ``tx.init(params)`` (zero momentum and Adam moments, Adam's bias-correction
    count at 0, as a new PyTorch optimizer), except that every schedule counter
    (``ScaleByScheduleState``, ``inject_hyperparams`` count and hyperparameters)
    is copied from ``rewound``, the optimizer state at the rewind step ``k``:
    open_lth's rewinding, ``train(..., start_step=k)`` with a new optimizer
    whose LR scheduler is stepped to ``k`` (Frankle et al. 2020, arXiv 1912.05671).

    Args:
      tx: the optax transformation.
      params: the (masked, rewound) params.
      rewound: ``tx``'s state at step ``k`` (same structure as ``tx.init(params)``).
      seed_axis: ``params`` and ``rewound`` carry a leading seed axis.

    Returns:
      the fresh optimizer state.
    """
    fresh = _over_seeds(tx.init, seed_axis)(params)
    if jax.tree.structure(fresh) != jax.tree.structure(rewound):  # type: ignore[operator]  # jaxlib's PyTreeDef stub
        raise ValueError("the rewound optimizer state does not have tx.init's structure")
    return _copy_schedules(fresh, rewound)


def _copy_schedules(fresh, rewound):
    def pick(f, r):
        if not isinstance(f, _SCHEDULE_STATES):
            return f
        f = f._replace(count=r.count)
        if hasattr(f, "hyperparams"):
            f = f._replace(
                hyperparams=r.hyperparams, inner_state=_copy_schedules(f.inner_state, r.inner_state)
            )
        if hasattr(f, "hyperparams_states"):
            f = f._replace(hyperparams_states=r.hyperparams_states)
        return f

    return jax.tree.map(pick, fresh, rewound, is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))


def start_state(
    state: training_lib.TrainState,
    masks: PyTree,
    *,
    rewind: str = "fresh",
    tx: optax.GradientTransformation | None = None,
    params: PyTree | None = None,
) -> training_lib.TrainState:
    """The state a level trains from: ``state`` (at the rewind step) with masked weights.

    ``params`` (default ``state.params``) are masked, ``m ⊙ θ``. ``rewind="fresh"``
    replaces the optimizer state by `fresh_opt_state` (needs ``tx``; at step 0 the
    state's own optimizer state is already fresh and ``tx`` may be None);
    ``"restore"`` keeps it.

    Raises:
      ValueError: unknown ``rewind``, or ``"fresh"`` after step 0 without ``tx``.
    """
    if rewind not in REWINDS:
        raise ValueError(f"unknown rewind {rewind!r}; use one of {REWINDS}")
    masked = pruning.apply_masks(state.params if params is None else params, masks)
    out = state.replace(params=masked)
    if rewind == "restore":
        return out
    if tx is None:
        if _step_of(state) == 0:
            return out
        raise ValueError(
            f"rewind='fresh' at step {_step_of(state)} needs the optax chain (train.tx, e.g. "
            "a lottery.Trainer) to build a new optimizer state; or use rewind='restore'"
        )
    fresh = fresh_opt_state(tx, masked, state.opt_state, seed_axis=_has_seed_axis(state))
    return out.replace(opt_state=fresh)


def instability(
    train: Callable,
    start: training_lib.TrainState,
    masks: PyTree,
    trained: PyTree,
    *,
    num_steps: int,
    seed: int,
    eval_fn: Callable,
    num_points: int = 11,
) -> dict:
    """Instability of a (sparse) network to SGD noise, with ``trained`` as the first copy.

    With a seed axis (``start`` from `wspace.training.init_states`, ``seed`` a list of
    seeds), the barrier is measured per seed and each value is a list.

    Trains a second copy ``θ₂ = train(start, masks, num_steps, seed=seed)`` and returns
    the barrier ``max_α E(α θ₁ + (1-α) θ₂) - (E(θ₁) + E(θ₂)) / 2`` of every metric of
    ``eval_fn`` on ``num_points`` points (Frankle et al. 2020, arXiv 1912.05671: two
    copies from the rewind point, data orders differing; they use the test error and
    30 points). ``trained`` (``θ₁``) must come from the same ``start`` with another seed.

    Returns:
      ``{"instability_<metric>": float}`` (``instability_loss``, ``instability_error``
      for `wspace.landscape.classification_objective` with ``metric="all"``).
    """
    copy, _ = train(start, masks, num_steps, seed=seed)

    def barrier_of(a, b):
        return landscape.linear_barrier(eval_fn, a, b, num_points=num_points)["barrier"]

    barrier = _over_seeds(barrier_of, _has_seed_axis(start))(trained, copy.params)
    if not isinstance(barrier, dict):
        barrier = {"value": barrier}
    return {f"instability_{k}": _to_json(v) for k, v in barrier.items()}


def train_dense(
    state: training_lib.TrainState,
    train: Callable,
    *,
    num_steps: int,
    rewind_step: int = 0,
    workdir: str | None = None,
) -> DenseRun:
    """Trains the dense network to ``num_steps``, keeping the state at ``rewind_step``.

    Args:
      state: the initial `TrainState` (step 0).
      train: ``train(state, masks, num_steps) -> (state, metrics)`` (a `Trainer`).
      num_steps: training length ``T`` of every level.
      rewind_step: ``k`` in ``[0, T)``.
      workdir: where the three states and the metrics are saved (a rerun loads them).

    Returns:
      A `DenseRun`.

    Raises:
      ValueError: ``rewind_step`` outside ``[0, num_steps)``.
    """
    _check_steps(num_steps, rewind_step)
    if _step_of(state) != 0:
        raise ValueError(f"the dense run must start at step 0, got a state at {_step_of(state)}")
    done = _load_json(workdir, "metrics.json")
    if done is not None:
        like = {"init": state, "rewind": state, "final": state}
        states = _restore(os.path.join(workdir, "states"), like)  # type: ignore[arg-type]  # done: workdir set
        return DenseRun(
            states["init"], states["rewind"], states["final"], done["metrics"], done["rewind_step"]
        )
    ones = all_true(state.params)
    t0 = time.time()
    rewind = state
    if rewind_step > 0:
        rewind, _ = train(state, ones, rewind_step)
    final, metrics = train(rewind, ones, num_steps)
    metrics = {**metrics, "train_time": time.time() - t0}
    if workdir:
        _save(os.path.join(workdir, "states"), {"init": state, "rewind": rewind, "final": final})
        io.write_json(
            os.path.join(workdir, "metrics.json"),
            {"metrics": metrics, "rewind_step": rewind_step, "num_steps": num_steps},
        )
    return DenseRun(state, rewind, final, metrics, rewind_step)


def masks_for_level(
    arm: str,
    level: int,
    *,
    dense: DenseRun,
    previous: Level | None = None,
    rate: float,
    layer_rates: dict | None,
    scope: str,
    exclude: Callable | None,
    reference: list | None = None,
    key: jax.Array | None = None,
) -> PyTree:
    """The mask an arm trains at ``level >= 1`` (see the module docstring for the arms).

    The pruning settings are required here: their defaults live in `run_arm`, the caller.

    Args:
      arm: one of `ARMS`.
      level: level ``l >= 1``.
      dense: the dense run.
      previous: this arm's level ``l - 1`` (``rewind`` prunes its params).
      rate, layer_rates, scope, exclude: as in `wspace.pruning.magnitude_masks`
        (``layer_rates`` is passed as ``layer_sparsity``: leaf names or name prefixes,
        matched by `wspace.paths.by_prefix`).
      reference: the ticket's levels (a list indexed by level) for ``reinit``/``random``.
      key: PRNG key for ``random`` (one per seed with a seed axis).

    With a seed axis (``dense`` from a seed-axis trainer) every mask is computed per
    seed from that seed's weights (`_seedwise`).
    """
    layer_rates = dict(layer_rates or {})
    seed_axis = _has_seed_axis(dense.final)
    magnitude_masks = _seedwise(pruning.magnitude_masks, seed_axis)
    if arm == "rewind":
        if previous is None:
            raise ValueError("the rewind arm needs the previous level")
        return magnitude_masks(
            previous.params,
            rate,
            masks=previous.masks,
            scope=scope,
            exclude=exclude,
            layer_sparsity=layer_rates,
        )
    cumulative = {k: level_rate(r, level) for k, r in layer_rates.items()}
    if arm == "oneshot":
        return magnitude_masks(
            dense.final.params,
            level_rate(rate, level),
            scope=scope,
            exclude=exclude,
            layer_sparsity=cumulative,
        )
    if arm == "reinit":
        if reference is None or len(reference) <= level:
            raise ValueError(f"the reinit arm needs the ticket's level {level} as reference")
        return reference[level].masks
    if arm == "random":
        if key is None:
            raise ValueError("the random arm needs a key")
        key = _seedwise(jax.random.fold_in, seed_axis)(key, level)
        if reference is not None and len(reference) > level:
            shuffle = _seedwise(pruning.shuffle_masks, seed_axis)
            return shuffle(reference[level].masks, key=key, exclude=exclude)
        return _seedwise(pruning.random_masks, seed_axis)(
            dense.final.params,
            level_rate(rate, level),
            key=key,
            scope="layerwise",
            exclude=exclude,
            layer_sparsity=cumulative,
        )
    raise ValueError(f"unknown arm {arm!r}; use one of {ARMS}")


def run_arm(
    arm: str,
    dense: DenseRun,
    train: Callable,
    *,
    levels: int,
    rate: float = 0.2,
    layer_rates: dict | None = None,
    scope: str = "layerwise",
    exclude: Callable | None = None,
    reference: list | None = None,
    key: jax.Array | None = None,
    init_fn: Callable | None = None,
    rewind: str = "fresh",
    measure: Callable | None = None,
    instability_eval: Callable | None = None,
    instability_seed: int | Sequence[int] | None = None,
    instability_points: int = 11,
    workdir: str | None = None,
    callback: Callable | None = None,
) -> list[Level]:
    """Runs one arm of IMP for ``levels`` levels after the dense level 0.

    Level 0 is the dense solution; level ``l`` trains the mask of
    `masks_for_level` from the rewound state (``reinit``: from fresh weights at
    step 0) to ``dense.num_steps`` and checks that every pruned weight is exactly
    zero afterwards.

    Args:
      arm: one of `ARMS`.
      dense: from `train_dense` (use ``dense.rewound_to(0)`` for rewind-to-init).
      train: ``train(state, masks, num_steps) -> (state, metrics)``.
      levels: number of pruning levels ``L >= 0``.
      rate: fraction of surviving weights pruned per level, in ``[0, 1)``.
      layer_rates: per-layer rates, e.g. ``{"head": 0.1}`` (LTH).
      scope: ``"layerwise"`` (LTH for fully connected nets) or ``"global"``.
      exclude: leaves never pruned (default: ``ndim < 2``).
      reference: the ticket's list of `Level` (``reinit`` needs it; ``random`` uses it).
      key: PRNG key (``random`` masks; ``reinit`` weights); with a seed axis one key
        per seed (stacked).
      init_fn: ``init_fn(key) -> params`` for ``reinit`` (mapped over the seed axis).
      rewind: ``"fresh"`` (default, open_lth: new optimizer state, schedule at
        step ``k``; needs ``train.tx`` when ``k > 0``) or ``"restore"`` (the
        whole step-``k`` state); see the module docstring. ``reinit`` starts
        from step 0 with ``tx.init`` of its fresh weights (when ``train.tx``).
      measure: ``measure(level, previous, dense) -> dict`` of extra metrics (e.g.
        geometry), called once per newly computed level (``previous`` is None at 0).
      instability_eval: ``g(params) -> scalar | dict`` (e.g. the test loss and
        error); with it, every newly computed level (level 0: the dense run from
        its rewind point) also trains a second copy from the same start with data
        order ``instability_seed`` and records `instability` (``instability_*``).
      instability_seed: the second copy's data-order seed (differs from the trainer's;
        a list, one per seed, with a seed axis).
      instability_points: points on the line between the copies.
      workdir: per-level files go to ``workdir/level_XX/`` (resumable).
      callback: ``callback(level)`` after each level (e.g. a progress print).

    Returns:
      The list of `Level`, index = level. With a seed axis (``dense`` trained by a
      seed-axis trainer) params and masks carry it, every level's checkpoint holds all
      seeds, and per-seed metrics are lists (``level``, ``arm``, ``train_time`` shared).

    Raises:
      ValueError: unknown arm, bad rate, missing reference/init_fn/key, or
        pruned weights that moved in training (the chain lacks ``keep_masked``).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {ARMS}")
    if not isinstance(levels, int | np.integer) or levels < 0:
        raise ValueError(f"levels must be an int >= 0, got {levels!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    if arm == "reinit" and init_fn is None:
        raise ValueError("the reinit arm needs init_fn(key) -> params")
    if arm in ("reinit", "random") and key is None:
        raise ValueError(f"the {arm} arm needs a key")
    if rewind not in REWINDS:
        raise ValueError(f"unknown rewind {rewind!r}; use one of {REWINDS}")
    if instability_eval is not None and instability_seed is None:
        raise ValueError("instability_eval needs instability_seed (the second copy's data order)")
    tx = getattr(train, "tx", None)
    seed_axis = _has_seed_axis(dense.final)
    per_seed = functools.partial(_over_seeds, seed_axis=seed_axis)
    if rewind == "fresh" and tx is None and dense.rewind_step > 0 and arm != "reinit":
        raise ValueError(
            "rewind='fresh' after step 0 needs train.tx (use a lottery.Trainer) to build a "
            "new optimizer state; or pass rewind='restore'"
        )
    _check_steps(dense.num_steps, dense.rewind_step)
    out: list[Level] = []
    like = {
        "params": dense.final.params,
        "model_state": dense.final.model_state,
        "masks": all_true(dense.final.params),
    }
    for level in range(levels + 1):
        where = os.path.join(workdir, f"level_{level:02d}") if workdir else None
        done = _load_json(where, "metrics.json")
        if done is not None:
            saved = _restore(os.path.join(where, "state"), like)  # type: ignore[arg-type]  # done: where set
            out.append(Level(level, saved["params"], saved["model_state"], saved["masks"], done))
            if callback:
                callback(out[-1])
            continue
        t0 = time.time()
        if level == 0:
            params, model_state = dense.final.params, dense.final.model_state
            masks, metrics = all_true(params), dict(dense.metrics)
            start = dense.rewind
        else:
            masks = masks_for_level(
                arm,
                level,
                dense=dense,
                previous=out[-1],
                rate=rate,
                layer_rates=layer_rates,
                scope=scope,
                exclude=exclude,
                reference=reference,
                key=key,
            )
            if arm == "reinit":
                fresh = per_seed(lambda k, lv=level: init_fn(jax.random.fold_in(k, lv)))(key)  # type: ignore[misc]  # reinit: init_fn checked above
                start = start_state(dense.init, masks, rewind=rewind, tx=tx, params=fresh)
            else:
                start = start_state(dense.rewind, masks, rewind=rewind, tx=tx)
            state, metrics = train(start, masks, dense.num_steps)
            _check_pruned_zero(state.params, masks, arm, level)
            params, model_state = state.params, state.model_state
        result = Level(level, params, model_state, masks, {})
        metrics = {
            **metrics,
            "level": level,
            "arm": arm,
            **_mask_stats(masks, exclude, seed_axis),
            "train_time": dense.metrics.get("train_time", 0.0) if level == 0 else time.time() - t0,
        }
        if measure is not None:
            metrics.update(measure(result, out[-1] if out else None, dense))
        if instability_eval is not None:
            metrics.update(
                instability(
                    train,
                    start,
                    masks,
                    params,
                    num_steps=dense.num_steps,
                    seed=instability_seed,  # type: ignore[arg-type]  # checked above with instability_eval
                    eval_fn=instability_eval,
                    num_points=instability_points,
                )
            )
        result = result._replace(metrics=metrics)
        if where:
            _save(
                os.path.join(where, "state"),
                {"params": params, "model_state": model_state, "masks": masks},
            )
            io.write_json(os.path.join(where, "metrics.json"), metrics)
        out.append(result)
        if callback:
            callback(result)
    return out


def _check_steps(num_steps, rewind_step) -> None:
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not isinstance(rewind_step, int | np.integer) or not 0 <= rewind_step < num_steps:
        raise ValueError(
            f"rewind_step must be an int in [0, {num_steps}) (the training length), "
            f"got {rewind_step!r}"
        )


def _mask_stats(masks, exclude, seed_axis: bool) -> dict:
    """``sparsity``, ``density`` and ``layer_sparsity`` of the masks (lists, one per seed)."""
    if not seed_axis:
        stats = pruning.sparsity(masks, exclude=exclude)
        return {
            "sparsity": stats["overall"], "density": stats["density"],
            "layer_sparsity": stats["layers"],
        }  # fmt: skip
    per = [
        _mask_stats(training_lib.seed_slice(masks, i), exclude, False)
        for i in range(len(jax.tree.leaves(masks)[0]))
    ]
    return {k: [p[k] for p in per] for k in per[0]}


def _to_json(v):
    """A scalar as a float; an array with a seed axis as a list of floats."""
    return float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()


def _check_pruned_zero(params, masks, arm, level) -> None:
    moved = sum(
        int(np.count_nonzero(np.asarray(p)[~np.asarray(m, bool)]))
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
    )
    if moved:
        raise ValueError(
            f"{moved} pruned weights are non-zero after training ({arm}, level {level}); "
            "end the optax chain with wspace.pruning.keep_masked() so pruned weights stay zero"
        )


def _load_json(where, name):
    path = os.path.join(where, name) if where else None
    if not path or not os.path.exists(path):
        return None
    return io.read_json(path, recover=f"delete {where} to recompute it")


def _save(directory: str, tree) -> None:
    if os.path.isdir(directory):  # left by a run killed before its metrics.json: stale
        shutil.rmtree(directory)
    ckpt = io.Checkpointer(directory, max_to_keep=1)
    ckpt.save(0, tree)
    ckpt.close()


def _restore(directory: str, like):
    """A level's (or the dense run's) saved states; a damaged or missing one names the
    directory to delete (deleting only ``state/`` leaves a level that claims to be done)."""
    ckpt = io.Checkpointer(directory, max_to_keep=1)
    try:
        return ckpt.restore(like)
    except io.CheckpointError as e:
        where = os.path.dirname(directory)
        msg = f"{where} is damaged ({e}); delete {where} to recompute it"
        raise io.CheckpointError(msg) from None
    finally:
        ckpt.close()
