"""Late-phase weights: an ensemble on a small subset of weights, averaged into one network.

Late in training (step ``T0``) a small subset of the weights -- BatchNorm
scale/shift and the classifier ``head`` in the paper -- is replicated into K
*members*; the rest stays shared. At the end the members are averaged in
weight space into one ordinary network (`LatePhase.average`).

Bind the configuration once and call its methods::

    late = LatePhase(num_members=10, select="bn_head")      # schedule="cycle"
    state = late.expand_state(state, tx)                     # at T0
    step = late.make_train_step(loss_fn, tx, mode="jit")     # or "sharded" / "pmap"
    params, model_state = late.average(state.params, state.model_state)

or `fit` (plain training to ``t0``, then late-phase training).

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
``theta`` steps. Scalar parts (step counts, hence learning-rate schedules)
advance every minibatch, like the code's per-epoch schedules. Not reproduced:
the code's quirk that all member optimizers step when member 0 is active.

Representation: a *late-phase params* tree is the plain params tree in which
the chosen leaves carry a leading member axis of size K (copies), or, for
``rank1`` selections, every chosen kernel ``W`` (shape ``(..., in, out)``)
stays shared and gains sibling leaves ``<name>_rank1_in`` (K, in) and
``<name>_rank1_out`` (K, out): member k uses ``W * (r_k s_k^T)``
(BatchEnsemble, Wen et al. 2020, arXiv 2002.06715). ``model_state``
(BatchNorm ``batch_stats``) gets a member axis on every leaf. Any flax model
works unchanged: members are formed by transforming params before ``apply``.

Pruning: `LatePhase.expand_masks` lays a mask tree out like the late-phase
params (every member gets the mask); `expand_state` carries masks held in a
``keep_masked`` state over the same way, so a pruned weight is exactly zero in
all K members through expansion, training and averaging.

Reference: von Oswald, Kobayashi, Meulemans, Henning, Grewe, Sacramento,
"Neural networks with late-phase weights", ICLR 2021, arXiv 2007.12927
(code: github.com/seijin-kobayashi/late-phase-weights).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace import averaging, training

PyTree = Any
PRESETS = ("bn_head", "batchnorm", "head", "rank1")
SCHEDULES = ("cycle", "random", "parallel")
COMBINE = ("sum", "mean", "every")
DEFAULT_COMBINE = {"cycle": "sum", "random": "every", "parallel": "mean"}
_R_IN, _R_OUT = "_rank1_in", "_rank1_out"


# ----------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which weights are late-phase, and how they are replicated.

    Attributes:
      predicate: ``predicate(path) -> bool`` on a param path, a tuple of
        strings such as ``("BatchNorm_0", "scale")`` or ``("head", "kernel")``.
      rank1: False: the chosen leaves themselves get a member axis (copies).
        True: each chosen kernel (ndim >= 2) stays shared and gets per-member
        rank-1 multiplicative factors ``W * (r s^T)``.
      name: a label (the preset's name or ``"custom"``).
    """

    predicate: Callable[[tuple[str, ...]], bool]
    rank1: bool = False
    name: str = "custom"


def _is_bn(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2].startswith("BatchNorm") and path[-1] in ("scale", "bias")


def _is_head(path: tuple[str, ...]) -> bool:
    return "head" in path


_PRESET_SELECTIONS = {
    "bn_head": Selection(lambda p: _is_bn(p) or _is_head(p), False, "bn_head"),
    "batchnorm": Selection(_is_bn, False, "batchnorm"),
    "head": Selection(_is_head, False, "head"),
    "rank1": Selection(lambda p: p[-1] == "kernel", True, "rank1"),
}


def selection(select: str | Callable | Selection, *, rank1: bool = False) -> Selection:
    """Turns a preset name, a path predicate or a `Selection` into a `Selection`.

    Presets: ``bn_head`` (every BatchNorm ``scale``/``bias`` and everything
    under ``head``: the paper's default), ``batchnorm``, ``head``, and
    ``rank1`` (rank-1 multiplicative factors on every ``kernel``, for models
    without BatchNorm, e.g. an MLP).

    Args:
      select: preset name, ``predicate(path: tuple[str, ...]) -> bool``, or a `Selection`.
      rank1: for a predicate: use rank-1 factors on the chosen kernels instead of copies.
    """
    if isinstance(select, Selection):
        return select
    if isinstance(select, str):
        if select not in _PRESET_SELECTIONS:
            raise ValueError(f"unknown late-phase preset {select!r}; use one of {PRESETS}")
        return _PRESET_SELECTIONS[select]
    if callable(select):
        return Selection(select, bool(rank1))
    raise ValueError(
        f"select must be a preset name {PRESETS}, a predicate on param paths or a Selection, "
        f"got {select!r}"
    )


def _path(keypath) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr(keypath, simple=True, separator="/").split("/"))


def _paths(tree) -> list[tuple[str, ...]]:
    return [_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_member_path(path: tuple[str, ...], sel: Selection) -> bool:
    """Does this leaf of a *late-phase* tree carry the member axis?"""
    if sel.rank1:
        return path[-1].endswith(_R_IN) or path[-1].endswith(_R_OUT)
    return bool(sel.predicate(path))


def _member_flags(tree, sel: Selection) -> list[bool]:
    """Per leaf of a late-phase-shaped tree: does it carry the member axis?"""
    return [_is_member_path(p, sel) for p in _paths(tree)]


def _check_k(num_members) -> int:
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members K must be an int >= 1, got {num_members!r}")
    return num_members


def _no_selection_error(tree, sel: Selection) -> ValueError:
    paths = ["/".join(p) for p in _paths(tree)]
    shown = ", ".join(paths[:12]) + (" ..." if len(paths) > 12 else "")
    what = "kernels (ndim >= 2)" if sel.rank1 else "leaves"
    return ValueError(
        f"late-phase selection {sel.name!r} selects no {what} of the params; "
        f"allowed: a predicate true for at least one of: {shown}"
    )


# ----------------------------------------------------------------------------- the config


class LatePhaseState(NamedTuple):
    """Optimizer state of `LatePhase.optimizer`.

    Attributes:
      count: late-phase steps taken (int32); the cycle schedule's member is ``count mod K``.
      inner: the wrapped ``tx``'s state over the late-phase params.
      accum: running sum of the shared weights' gradients in the current cycle
        (``combine`` ``"sum"``/``"mean"`` under cycle/random; ``()`` otherwise).
    """

    count: jax.Array
    inner: PyTree
    accum: PyTree


@dataclasses.dataclass(frozen=True)
class LatePhase:
    """Late-phase weights, configured once: which weights, how many members, which schedule.

    Attributes:
      num_members: K >= 1.
      select: preset name (``bn_head``: the paper's BatchNorm affine + head),
        predicate on param paths, or a `Selection` (see `selection`).
      schedule: ``"cycle"`` (default), ``"random"`` or ``"parallel"`` (see module docstring).
      combine: ``"sum"``, ``"mean"`` or ``"every"``; None: the schedule's
        official pairing (`DEFAULT_COMBINE`: cycle -> sum, random -> every,
        parallel -> mean).
      noise: std of the members' perturbation at expansion (0 in every official config).
      bn_eps: BatchNorm epsilon used by `average` (flax's default 1e-5).

    Reference: von Oswald et al. 2021, arXiv 2007.12927 (Algorithm 1).
    """

    num_members: int = 10
    select: Any = "bn_head"
    schedule: str = "cycle"
    combine: str | None = None
    noise: float = 0.0
    bn_eps: float = 1e-5

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

    @property
    def accumulates(self) -> bool:
        """Do the shared weights step once per K minibatches (cycle/random with sum/mean)?"""
        return self.schedule != "parallel" and self.combine != "every"

    # ------------------------------------------------------------------ expansion

    def expand(self, params: PyTree, *, key: jax.Array | None = None) -> PyTree:
        """Gives the chosen weights a leading member axis of size K; the rest stays shared.

        Copies: ``phi_k = phi + noise * eps_k``, ``eps_k ~ N(0, 1)``. Rank-1:
        ``r_k = 1 + noise * eps``, ``s_k = 1 + noise * eps'`` (with ``noise=0``
        every member equals the plain network exactly).

        Args:
          params: the plain params tree (nested dicts for ``rank1``).
          key: PRNG key, required when ``noise > 0``.

        Returns:
          The late-phase params tree.
        """
        if self.noise > 0 and key is None:
            raise ValueError(f"noise={self.noise} > 0 needs a PRNG key; got key=None")
        return _expand(params, jax.random.PRNGKey(0) if key is None else key, cfg=self)

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
        return _expand(masks, jax.random.PRNGKey(0), cfg=dataclasses.replace(self, noise=0.0))

    def expand_opt_state(
        self, tx: optax.GradientTransformation, opt_state: PyTree, params: PyTree, late_params
    ) -> PyTree:
        """Carries ``tx``'s state of the plain params over to the late-phase params.

        Every part of ``opt_state`` shaped like ``params`` (momenta, Adam
        moments, SWA means, ``keep_masked`` masks) is laid out like
        ``late_params``: member leaves get K copies of the plain leaf's state,
        shared leaves keep theirs, new rank-1 factors get ``tx.init``'s fresh
        state. Everything else (step counts, schedules' counters, injected
        hyperparameters) is kept, so learning-rate schedules continue.

        Returns:
          The state of ``tx`` for ``late_params`` (not wrapped; see `expand_state`).

        Raises:
          ValueError: when the parts cannot be lined up (then start from ``tx.init``).
        """
        pdef = jax.tree.structure(params)
        is_p = lambda x: x is not None and jax.tree.structure(x) == pdef
        old, odef = jax.tree.flatten(opt_state, is_leaf=is_p)
        fresh = []
        if self.select.rank1:  # new factor leaves need tx's own initial state
            ldef = jax.tree.structure(late_params)
            is_l = lambda x: x is not None and jax.tree.structure(x) == ldef
            fresh = [x for x in jax.tree.flatten(tx.init(late_params), is_leaf=is_l)[0] if is_l(x)]
            if len(fresh) != sum(map(is_p, old)):
                raise ValueError(
                    f"cannot line up {sum(map(is_p, old))} params-shaped parts of the optimizer "
                    f"state with {len(fresh)} of a fresh late-phase state; use tx.init"
                )
        fresh_iter = iter(fresh)
        out = [self._expand_part(o, next(fresh_iter, None)) if is_p(o) else o for o in old]
        return jax.tree.unflatten(odef, out)

    def _expand_part(self, plain_tree, fresh_late):
        if fresh_late is None:
            return self.expand_masks(plain_tree)  # a broadcast of the member leaves
        by_path = dict(zip(_paths(plain_tree), jax.tree.leaves(plain_tree), strict=True))

        def one(kp, fresh):
            p = _path(kp)
            if p not in by_path:  # a new rank-1 factor
                return fresh
            return by_path[p]

        return jax.tree_util.tree_map_with_path(one, fresh_late)

    def expand_state(
        self,
        state: training.TrainState,
        tx: optax.GradientTransformation,
        *,
        key: jax.Array | None = None,
        reset_opt_state: bool = False,
    ) -> training.TrainState:
        """The plain `TrainState` at T0 as a late-phase state for `make_train_step`.

        Params by `expand`, model state by `expand_model_state`, and the
        optimizer state of ``optimizer(tx)`` around ``tx``'s state carried over
        by `expand_opt_state` (``reset_opt_state``: a fresh ``tx.init``).
        """
        late = self.expand(state.params, key=key)
        if reset_opt_state:
            inner = tx.init(late)
        else:
            inner = self.expand_opt_state(tx, state.opt_state, state.params, late)
        opt_state = LatePhaseState(jnp.zeros((), jnp.int32), inner, self._zero_accum(late))
        return state.replace(
            params=late, model_state=self.expand_model_state(state.model_state), opt_state=opt_state
        )

    # ------------------------------------------------------------------ members

    def member_axes(self, late_params: PyTree) -> PyTree:
        """The vmap ``in_axes`` of a late-phase params tree: 0 on member leaves, None on shared."""
        flags = iter(_member_flags(late_params, self.select))
        return jax.tree.map(lambda _: 0 if next(flags) else None, late_params)

    def member(self, params: PyTree, model_state: PyTree, k) -> tuple[PyTree, PyTree]:
        """Member k (an int or a traced index) as a plain network ``(params_k, model_state_k)``."""
        flags = iter(_member_flags(params, self.select))
        p = jax.tree.map(lambda x: x[k] if next(flags) else x, params)
        return _effective(p, self.select), jax.tree.map(lambda x: x[k], model_state)

    def num_late_phase_params(self, late_params: PyTree) -> int:
        """Scalars in the member leaves (all K members): the ensemble's extra memory."""
        flags = _member_flags(late_params, self.select)
        leaves = jax.tree.leaves(late_params)
        return sum(math.prod(x.shape) for x, f in zip(leaves, flags, strict=True) if f)

    def member_index(self, count: jax.Array, key: jax.Array) -> jax.Array | None:
        """The active member of a step: ``count mod K`` (cycle), uniform from ``key`` (random).

        None under ``"parallel"`` (every member is active).
        """
        if self.schedule == "cycle":
            return jnp.mod(count, self.num_members).astype(jnp.int32)
        if self.schedule == "random":
            return jax.random.randint(jax.random.fold_in(key, 0x1A7E), (), 0, self.num_members)
        return None

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

    # ------------------------------------------------------------------ optimizer

    def _zero_accum(self, late_params):
        if not self.accumulates:
            return ()
        flags = iter(_member_flags(late_params, self.select))
        return jax.tree.map(
            lambda x: jnp.zeros((), x.dtype) if next(flags) else jnp.zeros_like(x), late_params
        )

    def _keep(self, new, old, flags, member, take_shared):
        """Rows of the active member (all rows if member is None) and, if take_shared, shared leaves
        from ``new``; everything else from ``old`` (bit for bit)."""
        k_members = self.num_members

        def one(n, o, is_member):
            if not is_member:
                return n if take_shared is True else jnp.where(take_shared, n, o)
            if member is None:
                return n
            rows = (jnp.arange(k_members) == member).reshape((k_members,) + (1,) * (n.ndim - 1))
            return jnp.where(rows, n, o)

        leaves = [
            one(n, o, f)
            for n, o, f in zip(jax.tree.leaves(new), jax.tree.leaves(old), flags, strict=True)
        ]
        return jax.tree.unflatten(jax.tree.structure(new), leaves)

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        """Wraps ``tx``: a step moves only the active member and, when due, the shared weights.

        ``update(grads, state, params, *, member=None, **extra_args)``: ``member``
        (required under cycle/random) is the active member. Member rows other
        than ``member`` keep their params (zero update) and their ``tx`` state
        bit for bit. Shared weights: with ``accumulates`` their gradients are
        summed in the state and ``tx`` steps on them once per K updates with the
        sum (``combine="sum"``) or mean (``"mean"``), their update and state
        being held in between; otherwise they step every update. Other
        arguments go to ``tx.update``.

        Returns:
          An ``optax.GradientTransformationExtraArgs`` with state `LatePhaseState`.
        """
        scale = 1.0 if self.combine == "sum" else 1.0 / self.num_members
        sel = self.select

        def init_fn(late_params):
            return LatePhaseState(
                jnp.zeros((), jnp.int32), tx.init(late_params), self._zero_accum(late_params)
            )

        def update_fn(grads, state, params=None, *, member=None, **extra_args):
            if member is None and self.schedule != "parallel":
                raise ValueError(f"schedule {self.schedule!r} needs update(..., member=k)")
            flags = _member_flags(grads, sel)
            is_m = jax.tree.unflatten(jax.tree.structure(grads), flags)
            boundary, accum, g_in = True, state.accum, grads
            if self.accumulates:
                boundary = jnp.mod(state.count + 1, self.num_members) == 0
                accum = jax.tree.map(lambda a, g, m: a if m else a + g, state.accum, grads, is_m)
                g_in = jax.tree.map(lambda g, a, m: g if m else a * scale, grads, accum, is_m)
                accum = jax.tree.map(
                    lambda a, m: a if m else jnp.where(boundary, jnp.zeros_like(a), a), accum, is_m
                )
            updates, inner = tx.update(g_in, state.inner, params, **extra_args)
            zeros = jax.tree.map(jnp.zeros_like, updates)
            updates = self._keep(updates, zeros, flags, member, boundary)
            inner = self._select_state(inner, state.inner, grads, member, boundary)
            return updates, LatePhaseState(optax.safe_int32_increment(state.count), inner, accum)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def _select_state(self, new, old, like, member, take_shared):
        """`_keep` on every part of a ``tx`` state shaped like the params; the rest from ``new``."""
        ldef = jax.tree.structure(like)
        flags = _member_flags(like, self.select)
        is_l = lambda x: x is not None and jax.tree.structure(x) == ldef
        new_parts, ndef = jax.tree.flatten(new, is_leaf=is_l)
        old_parts = jax.tree.flatten(old, is_leaf=is_l)[0]
        out = [
            self._keep(n, o, flags, member, take_shared) if is_l(n) else n
            for n, o in zip(new_parts, old_parts, strict=True)
        ]
        return jax.tree.unflatten(ndef, out)

    # ------------------------------------------------------------------ training

    def make_train_step(
        self,
        loss_fn: Callable,
        tx: optax.GradientTransformation,
        *,
        estimator: Callable = jax.value_and_grad,
        mode: str = "jit",
        mesh: jax.sharding.Mesh | None = None,
        donate: bool = True,
    ) -> Callable:
        """A compiled late-phase step ``step(state, batch, tx_args=None) -> (state, metrics)``.

        The step of `wspace.training.make_train_step` with the member chosen
        first: ``key, sub = split(state.key)``, ``k = member_index(count,
        sub)``, gradients of `member_loss` (or `parallel_loss`) by
        ``estimator``, ``optimizer(tx).update(..., member=k)``. Rows of members
        other than k (params, model state, optimizer state) are carried over
        bit for bit. The state comes from `expand_state` (its ``opt_state`` is a
        `LatePhaseState`).

        Args:
          loss_fn: the plain loss, ``loss_fn(params, model_state, batch, key) ->
            (loss, (model_state, metrics))``.
          tx: the optax transformation (the same as in the plain phase).
          estimator: gradient estimator with the shape of `jax.value_and_grad`.
          mode: ``jit``, ``sharded`` (batch split over ``mesh``'s ``data`` axis,
            state replicated; BatchNorm still normalises over the whole
            minibatch) or ``pmap`` (per-device BatchNorm statistics, gradients
            ``pmean``-ed; the member is the same on every device).
          mesh: the mesh for ``sharded`` mode (default `wspace.training.default_mesh`).
          donate: donate the input state's buffers.
        """
        if mode not in training.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {training.MODES}")
        opt = self.optimizer(tx)
        parallel = self.schedule == "parallel"
        loss = self.parallel_loss(loss_fn) if parallel else self.member_loss(loss_fn)

        def step(state, batch, tx_args, axis_name=None):
            key, sub = jax.random.split(state.key)
            member = self.member_index(state.opt_state.count, sub)
            if axis_name is not None:  # different noise per device, the same member
                sub = jax.random.fold_in(sub, jax.lax.axis_index(axis_name))
            fn = loss if parallel else functools.partial(_with_member, loss, member)
            grad_fn = estimator(fn, has_aux=True)
            (value, (model_state, metrics)), grads = grad_fn(
                state.params, state.model_state, batch, sub
            )
            metrics = {**metrics, "loss": jnp.mean(value)}
            if axis_name is not None:
                grads, model_state, metrics = jax.lax.pmean(
                    (grads, model_state, metrics), axis_name
                )
            if not parallel:  # rows of the other members bit for bit (also after a pmean)
                all_rows = [True] * len(jax.tree.leaves(model_state))
                model_state = self._keep(model_state, state.model_state, all_rows, member, True)
            updates, opt_state = opt.update(
                grads, state.opt_state, state.params, member=member, **(tx_args or {})
            )
            params = optax.apply_updates(state.params, updates)
            flags = _member_flags(params, self.select)
            params = self._keep(params, state.params, flags, member, True)
            new_state = state.replace(
                step=state.step + 1,
                params=params,
                model_state=model_state,
                opt_state=opt_state,
                key=key,
            )
            return new_state, metrics

        return _compile(step, mode, mesh, donate)

    def fit(
        self,
        state: training.TrainState,
        loss_fn: Callable,
        tx: optax.GradientTransformation,
        data,
        *,
        apply_fn: Callable,
        t0: int,
        num_steps: int,
        batch_size: int,
        key: jax.Array | None = None,
        seed: int = 0,
        mode: str = "jit",
        mesh: jax.sharding.Mesh | None = None,
        eval_every: int = 100,
        workdir: str | None = None,
        progress: bool = True,
    ) -> tuple[training.TrainState, list[dict]]:
        """Plain training up to step ``t0``, then late-phase training to ``num_steps``.

        Both phases run through `wspace.training.fit` (same data stream,
        continued; the plain step from `wspace.training.make_train_step`, the
        late one from `make_train_step`, both in ``mode``), switched once at
        ``t0`` by `expand_state`. Late-phase evaluations use the averaged
        network. With a workdir the phases write into ``workdir/plain`` and
        ``workdir/late`` and a rerun resumes.

        Args:
          state: plain `TrainState` at step 0 (or resumed).
          loss_fn: the plain loss; tx: the optax transformation (its state is carried over at t0).
          data, apply_fn, batch_size, seed, eval_every, progress, mode, mesh:
            as `wspace.training.fit`.
          t0: the late-phase start, ``0 <= t0 <= num_steps``.
          num_steps: total steps.
          key: PRNG key of the members' initial noise (needed when ``noise > 0``).

        Returns:
          ``(late-phase state at num_steps, evaluation records of both phases)``;
          collapse the state with `average`.
        """
        if isinstance(t0, bool) or not isinstance(t0, int) or not 0 <= t0 <= num_steps:
            raise ValueError(f"t0 must be an int in [0, num_steps={num_steps}], got {t0!r}")
        if self.schedule == "parallel" and batch_size % self.num_members:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by K={self.num_members} "
                "under schedule='parallel'"
            )
        if mode not in training.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {training.MODES}")
        sub = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
        kw = dict(
            batch_size=batch_size,
            seed=seed,
            mode=mode,
            mesh=mesh,
            eval_every=eval_every,
            progress=progress,
        )
        history = []
        if t0 > 0:
            plain_step = training.make_train_step(loss_fn, tx, mode=mode, mesh=mesh)
            state, hist = training.fit(
                state, plain_step, data, apply_fn=apply_fn, num_steps=t0, workdir=sub("plain"), **kw
            )
            history += [{**r, "phase": "plain"} for r in hist]
        late_state = self.expand_state(state, tx, key=key)
        late_state, hist = training.fit(
            late_state,
            self.make_train_step(loss_fn, tx, mode=mode, mesh=mesh),
            data,
            apply_fn=self.averaged_apply(apply_fn),
            num_steps=num_steps,
            workdir=sub("late"),
            **kw,
        )
        history += [{**r, "phase": "late"} for r in hist]
        return late_state, history

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
        members the result is the original network exactly (on CPU).

        Returns:
          ``(params, model_state)`` of one plain network for the unchanged ``apply``.
        """
        return _average(params, model_state, sel=self.select, eps=self.bn_eps)

    def averaged_apply(self, apply_fn: Callable) -> Callable:
        """``apply(variables, x, **kw)`` of the averaged network, for late-phase ``variables``."""

        def apply(variables, x, **kwargs):
            params = variables["params"]
            state = {k: v for k, v in dict(variables).items() if k != "params"}
            p, s = self.average(params, state)
            return apply_fn({"params": p, **s}, x, **kwargs)

        return apply


def _with_member(loss, member, params, model_state, batch, key):
    return loss(params, model_state, batch, key, member)


def _compile(step, mode: str, mesh, donate: bool) -> Callable:
    """Compiles ``step(state, batch, tx_args, axis_name=None)`` as `training.make_train_step` does."""
    donate_argnums = (0,) if donate else ()
    if mode == "jit":
        compiled = jax.jit(step, donate_argnums=donate_argnums)
    elif mode == "sharded":
        mesh = mesh or training.default_mesh()
        repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        compiled = jax.jit(
            step,
            in_shardings=(repl, split, repl),
            out_shardings=(repl, repl),
            donate_argnums=donate_argnums,
        )
    else:
        compiled = jax.pmap(
            lambda s, b, a: step(s, b, a, axis_name="batch"),
            axis_name="batch",
            in_axes=(0, 0, None),
            donate_argnums=donate_argnums,
        )

    def train_step(state, batch, tx_args=None):
        return compiled(state, batch, tx_args)

    return train_step


# ----------------------------------------------------------------------------- internals


@functools.partial(jax.jit, static_argnames=("cfg",))
def _expand(params: PyTree, key: jax.Array, *, cfg: LatePhase) -> PyTree:
    sel, k_members = cfg.select, cfg.num_members
    if sel.rank1:
        chosen = [
            p
            for p, x in zip(_paths(params), jax.tree.leaves(params), strict=True)
            if sel.predicate(p) and jnp.ndim(x) >= 2
        ]
        if not chosen:
            raise _no_selection_error(params, sel)
        return _add_noise(_add_rank1(params, (), sel, k_members), sel, key, cfg.noise)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not any(sel.predicate(_path(kp)) for kp, _ in flat):
        raise _no_selection_error(params, sel)
    leaves = [
        jnp.broadcast_to(x, (k_members,) + jnp.shape(x)) if sel.predicate(_path(kp)) else x
        for kp, x in flat
    ]
    return _add_noise(jax.tree.unflatten(jax.tree.structure(params), leaves), sel, key, cfg.noise)


def _add_noise(late, sel: Selection, key, noise: float):
    """``x + noise * N(0, 1)`` on the member leaves: one draw for all of them, split by leaf."""
    if noise == 0:
        return late
    paths, leaves = _paths(late), jax.tree.leaves(late)
    idx = [i for i, p in enumerate(paths) if _is_member_path(p, sel)]
    eps = jax.random.normal(key, (sum(leaves[i].size for i in idx),))
    start = 0
    for i in idx:
        x = leaves[i]
        leaves[i] = x + noise * eps[start : start + x.size].reshape(x.shape).astype(x.dtype)
        start += x.size
    return jax.tree.unflatten(jax.tree.structure(late), leaves)


def _add_rank1(tree, path, sel, k_members):
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"rank-1 late-phase weights need params as nested dicts; at {path} "
            f"found {type(tree).__name__}"
        )
    out = {}
    for name, value in tree.items():
        p = path + (str(name),)
        if isinstance(value, Mapping):
            out[name] = _add_rank1(value, p, sel, k_members)
            continue
        out[name] = value
        if sel.predicate(p) and jnp.ndim(value) >= 2:
            for suffix, size in ((_R_IN, value.shape[-2]), (_R_OUT, value.shape[-1])):
                if name + suffix in tree:
                    raise ValueError(f"params already hold {'/'.join(p)}{suffix}")
                out[name + suffix] = jnp.ones((k_members, size), value.dtype)
    return out


def _effective(params, sel: Selection):
    """One member's plain params: rank-1 factors multiplied into their kernels and dropped."""
    if not sel.rank1:
        return params
    return _apply_rank1(params)


def _fold_rank1(tree, factor):
    """Multiplies each kernel by ``factor(r, s)`` of its rank-1 factors and drops the factors."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for name, value in tree.items():
        if name.endswith(_R_IN) or name.endswith(_R_OUT):
            continue
        if isinstance(value, Mapping):
            out[name] = _fold_rank1(value, factor)
        elif name + _R_IN in tree:
            out[name] = value * factor(tree[name + _R_IN], tree[name + _R_OUT])
        else:
            out[name] = value
    return out


def _apply_rank1(tree):
    """One member: ``W * (r s^T)``."""
    return _fold_rank1(tree, lambda r, s: r[:, None] * s[None, :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(x, c):
    return x


def _scale_grad_fwd(x, c):
    return x, None


def _scale_grad_bwd(c, _, g):
    return (g * jnp.asarray(c, g.dtype),)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _mean0(x):
    """Mean over the member axis, computed as ``x_0 + mean(x - x_0)`` (exact for equal members)."""
    return x[0] + jnp.mean(x - x[0], axis=0)


@functools.partial(jax.jit, static_argnames=("sel", "eps"))
def _average(params, model_state, *, sel: Selection, eps: float):
    flags = _member_flags(params, sel)
    if sel.rank1:
        avg = _fold_rank1(params, lambda r, s: _mean0(r[:, :, None] * s[:, None, :]))
    else:
        it = iter(flags)
        avg = jax.tree.map(lambda x: _mean0(x) if next(it) else x, params)
    is_member = dict(zip(_paths(params), flags, strict=True))
    bn = {}  # path of a BN module -> (scale*, bias*, mean*, var*)
    for path, node in _stat_nodes(model_state):
        bn[path[1:]] = _average_bn(params, path[1:], node, is_member, eps)
    return _replace_affine(avg, (), bn), _replace_stats(model_state, bn)


def _stat_nodes(tree, path=()) -> Iterable:
    if isinstance(tree, Mapping):
        if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
            yield path, tree
            return
        for k, v in tree.items():
            yield from _stat_nodes(v, path + (str(k),))


def _get(tree, path):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _average_bn(params, path, stats, is_member, eps):
    node = _get(params, path)
    if node is None or "scale" not in node or "bias" not in node:
        raise ValueError(
            f"BatchNorm statistics at {'/'.join(path)} need 'scale' and 'bias' params at the same "
            f"path to average the affine maps; found {None if node is None else sorted(node)}"
        )
    mean, var = stats["mean"], stats["var"]  # (K, C)
    k_members = mean.shape[0]

    def per_member(name):
        x = node[name]
        return (
            x
            if is_member.get(path + (name,), False)
            else jnp.broadcast_to(x, (k_members,) + x.shape)
        )

    scale, bias = per_member("scale"), per_member("bias")
    m_star, v_star = _mean0(mean), _mean0(var)
    root = jnp.sqrt(var + eps)
    a = scale / root
    scale_star = _mean0(scale * (jnp.sqrt(v_star + eps) / root))
    bias_star = _mean0(bias + a * (m_star - mean))
    return scale_star, bias_star, m_star, v_star


def _replace_stats(tree, bn, path=()):
    if not isinstance(tree, Mapping):
        return _mean0(tree)
    if path[1:] in bn and "mean" in tree and "var" in tree:
        _, _, m, v = bn[path[1:]]
        return {**{k: _mean0(x) for k, x in tree.items()}, "mean": m, "var": v}
    return {k: _replace_stats(v, bn, path + (str(k),)) for k, v in tree.items()}


def _replace_affine(tree, path, bn):
    if not isinstance(tree, Mapping):
        return tree
    if path in bn:
        scale, bias, _, _ = bn[path]
        return {**tree, "scale": scale, "bias": bias}
    return {k: _replace_affine(v, path + (str(k),), bn) for k, v in tree.items()}


# ----------------------------------------------------------------------------- module API


def fit(
    state: training.TrainState,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    data,
    *,
    num_members: int,
    t0: int,
    select="bn_head",
    schedule: str = "cycle",
    combine: str | None = None,
    noise: float = 0.0,
    **kwargs,
) -> tuple[training.TrainState, list[dict]]:
    """``LatePhase(num_members, select, schedule, combine, noise).fit(state, loss_fn, tx, data,
    t0=t0, **kwargs)``: plain training to ``t0``, then late-phase training (see `LatePhase.fit`).
    """
    late = LatePhase(num_members, select, schedule, combine, noise)
    return late.fit(state, loss_fn, tx, data, t0=t0, **kwargs)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"wspace.late_phase.{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )


def _par(select="bn_head", num_members=1, combine="mean", noise=0.0, eps=1e-5) -> LatePhase:
    return LatePhase(num_members, select, "parallel", combine, noise, eps)


def _old_expand_state(
    state, tx, select, num_members, *, key=None, noise=0.0, reset_opt_state=False
):
    late = _par(select, num_members, noise=noise)  # returns tx's state unwrapped (parallel)
    p = late.expand(state.params, key=key)
    opt = (
        tx.init(p)
        if reset_opt_state
        else late.expand_opt_state(tx, state.opt_state, state.params, p)
    )
    return state.replace(
        params=p, model_state=late.expand_model_state(state.model_state), opt_state=opt
    )


# Old names (one release): the functions of the first API, each with ``select=`` in its signature,
# and the parallel schedule of `late_phase_loss` as the only one.
_OLD = {
    "member_axes": lambda t, select="bn_head": _par(select).member_axes(t),
    "expand": lambda p, select, k, *, key=None, noise=0.0: _par(select, k, noise=noise).expand(
        p, key=key
    ),
    "expand_model_state": lambda s, k: LatePhase(k).expand_model_state(s),
    "expand_opt_state": lambda tx, o, p, lp_, select="bn_head", *, reset=False: (
        tx.init(lp_) if reset else _par(select).expand_opt_state(tx, o, p, lp_)
    ),
    "expand_state": _old_expand_state,
    "member": lambda p, s, k, select="bn_head": _par(select).member(p, s, k),
    "late_phase_loss": lambda f, k, select="bn_head", *, combine="mean": _par(
        select, k, combine
    ).parallel_loss(f),
    "average": lambda p, s, select="bn_head", *, eps=1e-5: _par(select, eps=eps).average(p, s),
    "averaged_apply": lambda f, select="bn_head", *, eps=1e-5: _par(select, eps=eps).averaged_apply(
        f
    ),
    "num_late_phase_params": lambda t, select="bn_head": _par(select).num_late_phase_params(t),
}
_MOVED = ("swa", "swa_params", "recompute_batch_stats", "SWAState")  # to wspace.averaging


def __getattr__(name):
    if name in _OLD:
        _deprecated(
            name,
            f"LatePhase(num_members, select, ...).{name.replace('late_phase_loss', 'make_train_step')}",
        )
        return _OLD[name]
    if name in _MOVED:
        _deprecated(name, f"wspace.averaging.{name}")
        return getattr(averaging, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
