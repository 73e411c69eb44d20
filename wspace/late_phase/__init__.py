"""Late-phase weights: an ensemble on a small subset of weights, averaged into one network.

Late in training (step ``T0``) a small subset of the weights -- BatchNorm
scale/shift and the classifier ``head`` in the paper -- is replicated into K
*members*; the rest stays shared. At the end the members are averaged in
weight space into one ordinary network (`LatePhase.average`).

`LatePhase` is a small frozen spec (which weights, K, schedule, combine); the
schedule itself is owned by an optax wrapper, `LatePhase.optimizer(tx)`, as
``optax.MultiSteps`` owns its accumulation: its state counts the late-phase steps,
the step reads the active member from it (`LatePhase.member_index`) and its
``update`` moves only that member's rows and, when due, the shared weights::

    late = LatePhase(num_members=10, select="bn_head")      # schedule="cycle"
    state = late.expand_state(state, tx)                     # at T0
    step = late.make_train_step(loss_fn, tx, mode="jit")     # or "sharded" / "pmap"
    params, model_state = late.average(state.params, state.model_state)

or `LatePhase.fit` (plain training to ``t0``, then late-phase training, through
`wspace.training.fit`). Steps compile through `wspace.training.compile_step`, the
one compile path of training: modes ``jit``, ``sharded``, ``pmap``, and
``seed_axis=True`` (S seeds as one program, the member axis inside each seed).

Schedules (who trains on a minibatch):

* ``"cycle"`` (default, the paper's Algorithm 1 and official CIFAR code):
  member ``k = t mod K`` (t counts late-phase steps) takes the *whole*
  minibatch; only its late-phase weights, BatchNorm statistics and optimizer
  state change (the other members are untouched, bit for bit); BatchNorm
  normalises over the whole minibatch.
* ``"random"``: as ``"cycle"`` with ``k`` drawn uniformly per step from the
  state's key (the official code's ``inner_training=False`` path).
* ``"parallel"``: a different algorithm, not the paper's: all K members run at
  once under `jax.vmap`, member k on slice k of the minibatch (B/K examples),
  so BatchNorm normalises over B/K examples ("ghost BatchNorm") and every
  member takes a step on every minibatch (K times as many member steps).

``combine`` (how the shared weights ``theta`` use the members' gradients):

* ``"sum"`` (default of ``"cycle"``; the official CIFAR code, Algorithm 1 with
  ``gamma_theta = 1``): the shared gradients of K *consecutive minibatches*
  (one per member) are summed and ``theta`` takes one optimizer step per K
  minibatches with the sum: ``theta <- U(theta, sum_k grad_theta L(M_k))``.
* ``"mean"``: the same with the mean (``gamma_theta = 1/K``; the official
  ImageNet script's learning rate / K). Under ``"parallel"``: the mean of the
  K slices' gradients, i.e. the plain gradient of the whole minibatch, every step.
* ``"every"`` (default of ``"random"``, as the official random path): ``theta``
  takes an optimizer step on every minibatch with that minibatch's gradient.
* Under ``"parallel"``, ``"sum"`` is the sum of the K slices' shared gradients
  of one minibatch, every step (for plain SGD: ``"mean"`` with a K-times
  larger learning rate on ``theta``).

Optimizer state (as the official code, which keeps one optimizer for the shared
weights and one per member): one ``tx`` state over the late-phase params, in
which the member rows of every params-shaped part (momenta, Adam moments) move
only when that member is active, and the shared part moves only when
``theta`` steps. At T0 the members' rows start as copies of the plain state
(``member_opt_state="copy"``) or fresh from ``tx.init`` (``"fresh"``, the
official code's new member optimizers); the expansion contract (which parts of
``tx``'s state are laid out over the members, and how bound masks and SWA means
are carried) is written out in `wspace.late_phase._optimizer`. Scalar parts
(step counts, hence learning-rate schedules) advance every minibatch, like the
code's per-epoch schedules. A `wspace.averaging.swa` inside ``tx`` averages the
iterates actually reached (members' rows included).
Not reproduced: the code's quirk that all member optimizers step when member 0 is active.

Representation: a *late-phase params* tree is the plain params tree in which
the chosen leaves carry a leading member axis of size K (copies), or, for
``rank1`` selections, every chosen kernel ``W`` (shape ``(..., in, out)``)
stays shared and gains sibling leaves ``<name>_rank1_in`` (K, in) and
``<name>_rank1_out`` (K, out): member k uses ``W * (r_k s_k^T)``
(BatchEnsemble, Wen et al. 2020, arXiv 2002.06715). ``model_state``
(BatchNorm ``batch_stats``) gets a member axis on every leaf. Any flax model
works unchanged: members are formed by transforming params before ``apply``.

Pruning: `LatePhase.expand_masks` lays a mask tree out like the late-phase
params (every member gets the mask); `expand_state` carries masks bound in
``keep_masked(masks)`` / ``mask_gradients(masks)`` over the same way, so a pruned
weight is exactly zero in all K members through expansion, training and
averaging.

Reference: von Oswald, Kobayashi, Meulemans, Henning, Grewe, Sacramento,
"Neural networks with late-phase weights", ICLR 2021, arXiv 2007.12927
(code: github.com/seijin-kobayashi/late-phase-weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wspace import averaging, pruning, training
from wspace import data as data_lib
from wspace.late_phase import _optimizer, _train
from wspace.late_phase._layout import (
    PRESETS,
    Selection,
    _average,
    _check_k,
    _effective,
    _expand,
    _no_selection_error,
    _scale_grad,
    selection,
)
from wspace.late_phase._optimizer import MEMBER_OPT_STATES, LatePhaseState

__all__ = [
    "COMBINE", "MEMBER_OPT_STATES", "PRESETS", "SCHEDULES", "LatePhase", "LatePhaseState",
    "Selection", "fit", "selection",
]  # fmt: skip

PyTree = Any
SCHEDULES = ("cycle", "random", "parallel")
COMBINE = ("sum", "mean", "every")
DEFAULT_COMBINE = {"cycle": "sum", "random": "every", "parallel": "mean"}


@dataclasses.dataclass(frozen=True)
class LatePhase:
    """Late-phase weights, configured once: which weights, how many members, which schedule.

    Attributes:
      num_members: K >= 1.
      select: preset name (``bn_head``: the paper's BatchNorm affine + head),
        predicate on param paths, or a `Selection` (see `selection`): which weights
        become members is a function of the params' paths.
      schedule: ``"cycle"`` (default), ``"random"`` or ``"parallel"`` (see module docstring).
      combine: ``"sum"``, ``"mean"`` or ``"every"``; None: the schedule's
        official pairing (`DEFAULT_COMBINE`: cycle -> sum, random -> every,
        parallel -> mean).
      noise: std of the members' perturbation at expansion (0 in every official config).
      bn_eps: BatchNorm epsilon used by `average` (flax's default 1e-5).
      member_opt_state: the members' optimizer state at T0: ``"copy"`` of the plain
        state (momenta carried over) or ``"fresh"`` from ``tx.init`` (the official
        code's new member optimizers); shared weights always keep theirs.

    Reference: von Oswald et al. 2021, arXiv 2007.12927 (Algorithm 1).
    """

    num_members: int = 10
    select: Any = "bn_head"
    schedule: str = "cycle"
    combine: str | None = None
    noise: float = 0.0
    bn_eps: float = 1e-5
    member_opt_state: str = "copy"

    def __post_init__(self):
        _check_k(self.num_members)
        object.__setattr__(self, "select", selection(self.select))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        combine = DEFAULT_COMBINE[self.schedule] if self.combine is None else self.combine
        allowed = ("sum", "mean") if self.schedule == "parallel" else COMBINE
        if combine not in allowed:
            raise ValueError(
                f"combine must be one of {allowed} for schedule {self.schedule!r}, got {combine!r}"
            )
        object.__setattr__(self, "combine", combine)
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.member_opt_state not in MEMBER_OPT_STATES:
            raise ValueError(
                f"member_opt_state must be one of {MEMBER_OPT_STATES}, "
                f"got {self.member_opt_state!r}"
            )

    @property
    def accumulates(self) -> bool:
        """Do the shared weights step once per K minibatches (cycle/random with sum/mean)?"""
        return self.schedule != "parallel" and self.combine != "every"

    # ------------------------------------------------------------------ expansion

    def expand(
        self, params: PyTree, *, key: jax.Array | None = None, masks: PyTree | None = None
    ) -> PyTree:
        """Gives the chosen weights a leading member axis of size K; the rest stays shared.

        Copies: ``phi_k = phi + noise * eps_k``, ``eps_k ~ N(0, 1)``. Rank-1:
        ``r_k = 1 + noise * eps``, ``s_k = 1 + noise * eps'`` (with ``noise=0``
        every member equals the plain network exactly).

        Args:
          params: the plain params tree (nested dicts for ``rank1``).
          key: PRNG key, required when ``noise > 0``.
          masks: pruning masks of ``params`` (`wspace.pruning`): pruned weights
            are exactly zero in every member (no noise lands on them).

        Returns:
          The late-phase params tree.
        """
        if self.noise > 0 and key is None:
            raise ValueError(f"noise={self.noise} > 0 needs a PRNG key; got key=None")
        late = _expand(
            params, jax.random.PRNGKey(0) if key is None else key, sel=self.select,
            k_members=self.num_members, noise=self.noise,
        )  # fmt: skip
        if masks is None:
            return late
        pruning.check_masks(params, masks)
        zero = lambda x, m: jnp.where(jnp.asarray(m, bool), x, jnp.zeros_like(x))
        return jax.tree.map(zero, late, self.expand_masks(masks))

    def expand_model_state(self, model_state: PyTree) -> PyTree:
        """Per-member copies of the non-param collections (``batch_stats``): axis 0 = K."""
        k = self.num_members
        return jax.tree.map(
            lambda x: jnp.broadcast_to(jnp.asarray(x), (k,) + jnp.shape(x)), model_state
        )

    def expand_masks(self, masks: PyTree) -> PyTree:
        """A mask tree of the plain params laid out like the late-phase params.

        Member leaves get the same mask in all K members; rank-1 factors are
        never pruned (all True): ``W * r s^T`` keeps W's zeros.
        """
        return _expand(
            masks, jax.random.PRNGKey(0), sel=self.select, k_members=self.num_members, noise=0.0
        )

    def expand_opt_state(
        self,
        tx: optax.GradientTransformation,
        opt_state: PyTree,
        params: PyTree,
        late_params: PyTree,
    ) -> PyTree:
        """Lays ``tx``'s state of the plain ``params`` out over ``late_params``.

        The expansion contract: every part of ``opt_state`` with the params' tree
        structure (momenta, Adam moments, SWA means, masks bound in ``keep_masked`` /
        ``mask_gradients``) is laid out like ``late_params``: member leaves get K
        copies of the plain leaf's part (``member_opt_state="fresh"``: of
        ``tx.init(params)``'s), shared leaves keep theirs, new rank-1 factors start at
        True (masks), themselves (SWA means) or 0 (every other part, as ``tx.init``).
        Everything else (step counts, schedules' counters, injected hyperparameters)
        is kept, so learning-rate schedules continue.

        Returns:
          The state of ``tx`` for ``late_params`` (not wrapped; see `expand_state`).
        """
        return _optimizer.expand_opt_state(
            self, tx, opt_state, params, late_params, self.member_opt_state
        )

    def expand_state(
        self,
        state: training.TrainState,
        tx: optax.GradientTransformation,
        *,
        key: jax.Array | None = None,
        masks: PyTree | None = None,
    ) -> training.TrainState:
        """The plain `TrainState` at T0 as a late-phase state for `make_train_step`.

        Params by `expand` (``key``, ``masks`` as there), model state by
        `expand_model_state`, and the state of ``optimizer(tx)`` around ``tx``'s
        state laid out by `expand_opt_state`; the random schedule's key is drawn
        from ``state.key``. For a state with a seed axis use ``jax.vmap`` (as `fit`).
        """
        late = self.expand(state.params, key=key, masks=masks)
        inner = self.expand_opt_state(tx, state.opt_state, state.params, late)
        opt_state = LatePhaseState(
            jnp.zeros((), jnp.int32),
            jax.random.fold_in(state.key, 0x1A7E),
            inner,
            _optimizer.zero_accum(self, late),
        )
        return state.replace(
            params=late, model_state=self.expand_model_state(state.model_state), opt_state=opt_state
        )

    # ------------------------------------------------------------------ members

    def member_mask(self, late_params: PyTree) -> PyTree:
        """Which leaves of a late-phase tree carry the member axis: a bool per leaf."""
        return self.select.members(late_params)

    def member_axes(self, late_params: PyTree) -> PyTree:
        """The vmap ``in_axes`` of a late-phase params tree: 0 on member leaves, None on shared."""
        return jax.tree.map(lambda m: 0 if m else None, self.select.members(late_params))

    def member(
        self, params: PyTree, model_state: PyTree, k: int | jax.Array
    ) -> tuple[PyTree, PyTree]:
        """Member k (an int or a traced index) as a plain network ``(params_k, model_state_k)``."""
        p = jax.tree.map(lambda x, m: x[k] if m else x, params, self.select.members(params))
        return _effective(p, self.select), jax.tree.map(lambda x: x[k], model_state)

    def num_late_phase_params(self, late_params: PyTree) -> int:
        """Scalars in the member leaves (all K members): the ensemble's extra memory."""
        leaves, flags = jax.tree.leaves(late_params), jax.tree.leaves(self.member_mask(late_params))
        return sum(math.prod(x.shape) for x, f in zip(leaves, flags, strict=True) if f)

    def member_index(self, opt_state: LatePhaseState) -> jax.Array | None:
        """The member the next step trains, read from the wrapper's state (as
        ``optax.MultiSteps.has_updated``): ``count mod K`` (cycle), uniform from the
        state's key (random), None under ``"parallel"`` (every member is active)."""
        return _optimizer.member_index(self, opt_state)

    # ------------------------------------------------------------------ losses

    def member_loss(self, loss_fn: Callable) -> Callable:
        """``fn(params, model_state, batch, key, member)``: ``loss_fn`` of member k on the batch.

        The whole minibatch goes through member ``k``; its new model state
        (BatchNorm statistics) is written into row k only. Under backprop the
        gradient of every other member's rows is exactly zero.
        """

        def wrapped(params, model_state, batch, key, member):
            pk, sk = self.member(params, model_state, member)
            loss, (new_sk, metrics) = loss_fn(pk, sk, batch, key)
            new_state = jax.tree.map(lambda full, x: full.at[member].set(x), model_state, new_sk)
            return loss, (new_state, metrics)

        return wrapped

    def parallel_loss(self, loss_fn: Callable) -> Callable:
        """``fn(params, model_state, batch, key)``: all K members at once on slices of the batch.

        The batch (size B, divisible by K) is split into K contiguous slices;
        ``jax.vmap`` over the member axis runs ``loss_fn`` of member k on slice
        k. The returned loss is ``1/K sum_k L_k``; gradients are
        ``dL_k/dphi_k`` for member k's weights and ``1/K sum_k dL_k/dtheta``
        (``combine="mean"``) or ``sum_k dL_k/dtheta`` (``"sum"``) for the
        shared weights. New model state is per member; metrics are averaged.
        """
        sel, k_members = self.select, self.num_members
        shared_scale = 1.0 if self.combine == "mean" else float(k_members)

        def wrapped(params, model_state, batch, key):
            axes = self.member_axes(params)
            if not any(a == 0 for a in jax.tree.leaves(axes, is_leaf=lambda x: x is None)):
                raise _no_selection_error(params, sel)
            sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch)}
            if len(sizes) != 1 or next(iter(sizes)) % k_members:
                raise ValueError(
                    f"batch leading sizes {sorted(sizes)} must be one size divisible by "
                    f"K={k_members}"
                )
            sliced = jax.tree.map(lambda x: x.reshape((k_members, -1) + x.shape[1:]), batch)
            keys = None if key is None else jax.random.split(key, k_members)
            scaled = jax.tree.map(
                lambda x, a: _scale_grad(x, shared_scale if a is None else float(k_members)),
                params,
                axes,
                is_leaf=lambda x: x is None,
            )

            def one(p, ms, b, k):
                return loss_fn(_effective(p, sel), ms, b, k)

            losses, (new_state, metrics) = jax.vmap(
                one, in_axes=(axes, 0, 0, None if keys is None else 0)
            )(scaled, model_state, sliced, keys)
            loss = jnp.mean(losses) if losses.ndim == 1 else losses.reshape(-1)
            return loss, (new_state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))

        return wrapped

    # ------------------------------------------------------------------ optimizer, training

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """Wraps ``tx``: a step moves only the active member and, when due, the shared weights.

        ``update(grads, state, params, **extra_args)`` trains the member
        `member_index` reads from ``state`` (all of them under ``"parallel"``).
        Member rows other than it keep their params (zero update) and their ``tx``
        state bit for bit. Shared weights: with ``accumulates`` their gradients are
        summed in the state and ``tx`` steps on them once per K updates with the sum
        (``combine="sum"``) or mean (``"mean"``), their update and state being held
        in between; otherwise they step every update. Extra arguments go to
        ``tx.update``. The state comes from `expand_state` (or ``init`` on
        late-phase params).

        Returns:
          An ``optax.GradientTransformationExtraArgs`` with state `LatePhaseState`.
        """
        return _optimizer.optimizer(self, tx)

    def make_train_step(
        self,
        loss_fn: Callable,
        tx: optax.GradientTransformation,
        *,
        estimator: Callable = jax.value_and_grad,
        mode: str = "jit",
        mesh: jax.sharding.Mesh | None = None,
        donate: bool = True,
        seed_axis: bool = False,
        seed_loop: str = "vmap",
    ) -> training.TrainStep:
        """A compiled late-phase step ``step(state, batch, tx_args=None) -> (state, metrics)``.

        The step of `wspace.training.make_train_step` with the member chosen
        first: ``key, sub = split(state.key)``, ``k = member_index(opt_state)``,
        gradients of `member_loss` (or `parallel_loss`) by ``estimator``,
        ``optimizer(tx).update(...)``. Rows of members other than k (params, model
        state, optimizer state) are carried over bit for bit. Compiled by
        `wspace.training.compile_step` (``step.scan`` fuses steps), so ``mode``,
        ``mesh``, ``donate``, ``seed_axis`` and ``seed_loop`` (``vmap``, ``map`` or
        ``unroll`` over the seeds) mean what they mean there; in
        ``pmap`` mode BatchNorm statistics are per device and the member is the same
        on every device. The state comes from `expand_state` (vmapped over seeds for
        ``seed_axis``).
        """
        if mode not in training.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {training.MODES}")
        body = _train.step_body(self, loss_fn, tx, estimator)
        return training.compile_step(
            body, mode, mesh, donate=donate, seed_axis=seed_axis, seed_loop=seed_loop
        )

    def fit(
        self,
        state: training.TrainState,
        loss_fn: Callable,
        tx: optax.GradientTransformation,
        data: data_lib.Dataset | Iterable[dict],
        *,
        t0: int,
        num_steps: int,
        estimator: Callable = jax.value_and_grad,
        eval_fn: Callable | None = None,
        apply_fn: Callable | None = None,
        key: jax.Array | None = None,
        masks: PyTree | None = None,
        workdir: str | None = None,
        seed_loop: str = "vmap",
        **fit_kwargs: Any,
    ) -> tuple[training.TrainState, list[dict]]:
        """Plain training up to step ``t0``, then late-phase training to ``num_steps``.

        Both phases run through `wspace.training.fit` (the same data stream,
        continued; the plain step from `wspace.training.make_train_step`, the
        late one from `make_train_step`, both in ``mode``), switched once at
        ``t0`` by `expand_state`. Late-phase records evaluate the averaged
        network: ``eval_fn`` receives `average_state` of the late state. With a
        workdir the phases checkpoint into ``workdir/plain`` and ``workdir/late``
        and a rerun resumes. Seeds as an axis: a state from
        `wspace.training.init_states` and ``seed=[s0, s1, ...]`` train every seed as
        one program (one checkpoint; records hold lists, one value per seed).
        Warns when the late phase has fewer steps than members.

        Args:
          state: plain `TrainState` at step 0 (or resumed), with a seed axis for a
            list of seeds.
          loss_fn: the plain loss; tx: the optax transformation (its state is laid out
            over the members at t0, see `expand_opt_state`).
          data: a `wspace.data.Dataset`, or an iterable of batch dicts that restarts
            on every ``iter()`` (then the late phase skips the first ``t0``
            batches); a one-shot iterator simply continues.
          t0: the late-phase start, ``0 <= t0 <= num_steps``.
          num_steps: total steps.
          estimator: gradient estimator with the shape of `jax.value_and_grad` (both phases).
          eval_fn, apply_fn: as `wspace.training.fit` (default evaluation: classification).
          key: PRNG key of the members' initial noise (needed when ``noise > 0``).
          masks: pruning masks of the plain params (see `expand`; with a seed axis
            shared by the seeds, or with a leading seed axis); bind them in ``tx``
            (``keep_masked(masks)``) or pass them per step as
            ``tx_args={"masks": masks}`` (laid out on the member axis for the late phase).
          workdir: as `wspace.training.fit` (None: nothing written).
          seed_loop: with a seed axis, how each compiled step (both phases) covers the
            seeds: ``"vmap"``, ``"map"`` or ``"unroll"`` (see
            `wspace.training.make_train_step`; ``"unroll"``: convolutions on CPU).
          **fit_kwargs: the other arguments of `wspace.training.fit` (``batch_size``,
            ``seed``, ``mode``, ``mesh``, ``eval_every``, ``tx_args``, ``writer``,
            ``train_eval_examples``, ``checkpoint_every``, ``progress``, ``steps_per_call``).

        Returns:
          ``(late-phase state at num_steps, records of both phases with "phase")``;
          collapse the state with `average`.
        """
        return _train.fit(
            self, state, loss_fn, tx, data, t0=t0, num_steps=num_steps, estimator=estimator,
            eval_fn=eval_fn, apply_fn=apply_fn, key=key, masks=masks, workdir=workdir,
            seed_loop=seed_loop, fit_kwargs=fit_kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ averaging

    def average(self, params: PyTree, model_state: PyTree) -> tuple[PyTree, PyTree]:
        """Collapses the members into one plain network by averaging in weight space.

        Member leaves: ``phi = 1/K sum_k phi_k``; rank-1 kernels: ``W * 1/K
        sum_k r_k s_k^T``. BatchNorm layers (any node of ``model_state``
        holding ``mean`` and ``var``, with ``scale`` and ``bias`` at the same
        path in ``params``) average their effective affine maps ``y = a_k x +
        b_k``, ``a_k = scale_k / sqrt(var_k + eps)``, ``b_k = bias_k - a_k
        mean_k``: the result keeps ``m* = mean_k mean_k``, ``v* = mean_k
        var_k`` as running stats and sets ``scale*``, ``bias*`` so that ``a* =
        mean_k a_k`` and ``b* = mean_k b_k`` -- the mean of the members'
        outputs, as the official code's ``set_average_specialists``. Other
        ``model_state`` leaves are averaged over members. With K identical
        members the result is the original network exactly (on CPU). A BatchNorm
        bias that is zero in every member (pruned) stays exactly zero: then ``m*
        = -b*/a*`` carries the shift. Pruned weights stay zero (mean of zeros).

        Returns:
          ``(params, model_state)`` of one plain network for the unchanged ``apply``.
        """
        return _average(params, model_state, sel=self.select, eps=self.bn_eps)

    def average_state(self, state: training.TrainState) -> training.TrainState:
        """``state`` with `average`-d params and model state (one plain network; opt_state kept)."""
        params, model_state = self.average(state.params, state.model_state)
        return state.replace(params=params, model_state=model_state)

    def averaged_apply(self, apply_fn: Callable) -> Callable:
        """``apply(variables, x, **kw)`` of the averaged network, for late-phase ``variables``."""

        def apply(variables, x, **kwargs):
            params = variables["params"]
            state = {k: v for k, v in dict(variables).items() if k != "params"}
            p, s = self.average(params, state)
            return apply_fn({"params": p, **s}, x, **kwargs)

        return apply

    def recalibrate(
        self,
        loss_fn: Callable,
        params: PyTree,
        model_state: PyTree,
        batches: Iterable[dict],
        *,
        key: jax.Array | None = None,
    ) -> PyTree:
        """Per-member BatchNorm statistics for late-phase params (e.g. after SWA).

        `wspace.averaging.recompute_batch_stats` for every member at once: on each
        batch, member k runs ``loss_fn`` in train mode with its own statistics (row
        k), as the official code's ``bn_update`` passes over the training data once
        per member. Call it before `average`.

        Args:
          loss_fn: the plain training loss; params, model_state: late-phase trees.
          batches: training batches; key: PRNG key of the loss (default ``PRNGKey(0)``).

        Returns:
          The late-phase model state with every member's recomputed statistics.

        Reference: Izmailov et al. 2018, arXiv 1803.05407; von Oswald et al. 2021.
        """

        def all_members(p, s, batch, k):  # a loss whose new model state holds every member's
            def one(m):
                pm, sm = self.member(p, s, m)
                return loss_fn(pm, sm, batch, jax.random.fold_in(k, m))[1][0]

            return None, (jax.vmap(one)(jnp.arange(self.num_members)), {})

        return averaging.recompute_batch_stats(all_members, params, model_state, batches, key=key)


def fit(
    state: training.TrainState,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    data: data_lib.Dataset | Iterable[dict],
    *,
    num_members: int,
    t0: int,
    select: str | Callable | Selection = "bn_head",
    schedule: str = "cycle",
    combine: str | None = None,
    noise: float = 0.0,
    **kwargs: Any,
) -> tuple[training.TrainState, list[dict]]:
    """``LatePhase(num_members, select, schedule, combine, noise).fit(state, loss_fn, tx, data,
    t0=t0, **kwargs)``: plain training to ``t0``, then late-phase training (see `LatePhase.fit`).
    """
    late = LatePhase(num_members, select, schedule, combine, noise)
    return late.fit(state, loss_fn, tx, data, t0=t0, **kwargs)
