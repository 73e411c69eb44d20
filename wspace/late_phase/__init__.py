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

or `fit` (plain training to ``t0``, then late-phase training). Both run in ``mode``
``jit``, ``sharded`` (``shard_members=True`` also splits the member axis over the
mesh) or ``pmap``, like `wspace.training.make_train_step`.

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
advance every minibatch, like the code's per-epoch schedules. A `wspace.averaging.swa`
inside ``tx`` averages the iterates actually reached (members' rows included).
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
import itertools
import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace import data as ws_data
from wspace import io, pruning, training
from wspace.late_phase._layout import (  # noqa: F401  (selection API re-exported)
    PRESETS,
    Selection,
    _average,
    _check_k,
    _effective,
    _expand,
    _member_flags,
    _no_selection_error,
    _path,
    _paths,
    _scale_grad,
    selection,
)
from wspace.late_phase._steps import _steps, _swa_of, _with_member

PyTree = Any
SCHEDULES = ("cycle", "random", "parallel")
COMBINE = ("sum", "mean", "every")
DEFAULT_COMBINE = {"cycle": "sum", "random": "every", "parallel": "mean"}


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
        masks: PyTree | None = None,
        reset_opt_state: bool = False,
    ) -> training.TrainState:
        """The plain `TrainState` at T0 as a late-phase state for `make_train_step`.

        Params by `expand` (``key``, ``masks`` as there), model state by
        `expand_model_state`, and the optimizer state of ``optimizer(tx)``
        around ``tx``'s state carried over by `expand_opt_state`
        (``reset_opt_state``: a fresh ``tx.init``).
        """
        late = self.expand(state.params, key=key, masks=masks)
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
            if params is not None:  # SWA means of the iterates really taken (rows held above)
                inner = _swa_of(inner, state.inner, optax.apply_updates(params, updates))
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
        shard_members: bool = False,
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
          shard_members: ``sharded`` mode only: the member axis of params, model
            state and optimizer state is split over the mesh's ``data`` axis (K
            divisible by its size; shared weights replicated). The step moves a
            replicated state there on its first call.
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

        if shard_members:
            if mode != "sharded":
                raise ValueError(f"shard_members=True needs mode='sharded', got {mode!r}")
            mesh = mesh or training.default_mesh()
            if self.num_members % mesh.shape["data"]:
                raise ValueError(
                    f"shard_members=True: K={self.num_members} members do not split over the "
                    f"{mesh.shape['data']} devices of the mesh's 'data' axis"
                )
            return self._compile_member_sharded(step, mesh, donate)
        return training.compile_step(step, mode, mesh, donate=donate)

    def _compile_member_sharded(self, step, mesh, donate: bool) -> Callable:
        """``step`` jitted with member leaves split over ``data`` (rows) and the rest replicated."""
        repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        compiled = {}

        def shardings(state):
            flags = _member_flags(state.params, self.select)
            by_flags = lambda t: jax.tree.unflatten(
                jax.tree.structure(t), [rows if f else repl for f in flags]
            )
            ldef = jax.tree.structure(state.params)
            is_l = lambda x: x is not None and jax.tree.structure(x) == ldef
            inner = jax.tree.map(
                lambda x: by_flags(x) if is_l(x) else jax.tree.map(lambda _: repl, x),
                state.opt_state.inner,
                is_leaf=is_l,
            )
            return state.replace(
                step=repl,
                params=by_flags(state.params),
                model_state=jax.tree.map(lambda _: rows, state.model_state),
                opt_state=LatePhaseState(
                    repl, inner, jax.tree.map(lambda _: repl, state.opt_state.accum)
                ),
                key=repl,
            )

        def train_step(state, batch, tx_args=None):
            key = jax.tree.structure(state)
            if key not in compiled:
                sh = shardings(state)
                fn = jax.jit(
                    step,
                    in_shardings=(sh, NamedSharding(mesh, P("data")), repl),
                    out_shardings=(sh, repl),
                    donate_argnums=(0,) if donate else (),
                )
                compiled[key] = (sh, fn)
            sh, fn = compiled[key]
            return fn(jax.device_put(state, sh), batch, tx_args)

        return train_step

    def fit(
        self,
        state: training.TrainState,
        loss_fn: Callable,
        tx: optax.GradientTransformation,
        data,
        *,
        t0: int,
        num_steps: int,
        eval_fn: Callable | None = None,
        apply_fn: Callable | None = None,
        key: jax.Array | None = None,
        masks: PyTree | None = None,
        workdir: str | None = None,
        shard_members: bool = False,
        **fit_kwargs,
    ) -> tuple[training.TrainState, list[dict]]:
        """Plain training up to step ``t0``, then late-phase training to ``num_steps``.

        Both phases run through `wspace.training.fit` (the same data stream,
        continued; the plain step from `wspace.training.make_train_step`, the
        late one from `make_train_step`, both in ``mode``), switched once at
        ``t0`` by `expand_state`. Late-phase records evaluate the averaged
        network: ``eval_fn`` receives `average_state` of the late state. With a
        workdir the phases write into ``workdir/plain`` and ``workdir/late`` and
        a rerun resumes.

        Args:
          state: plain `TrainState` at step 0 (or resumed).
          loss_fn: the plain loss; tx: the optax transformation (its state is carried over at t0).
          data: a `wspace.data.Dataset`, or an iterable of batch dicts that restarts
            on every ``iter()`` (then the late phase skips the first ``t0``
            batches); a one-shot iterator simply continues.
          t0: the late-phase start, ``0 <= t0 <= num_steps``.
          num_steps: total steps.
          eval_fn, apply_fn: as `wspace.training.fit` (default evaluation: classification).
          key: PRNG key of the members' initial noise (needed when ``noise > 0``).
          masks: pruning masks of the plain params (see `expand`); keep them in
            ``tx`` too (``wspace.pruning.keep_masked``), or pass them per step as
            ``tx_args={"masks": masks}`` (laid out on the member axis for the late phase).
          workdir: as `wspace.training.fit` (None: nothing written).
          shard_members: split the member axis over the mesh (see `make_train_step`).
          **fit_kwargs: the other arguments of `wspace.training.fit` (``batch_size``,
            ``seed``, ``mode``, ``mesh``, ``eval_every``, ``tx_args``, ``writer``,
            ``train_eval_examples``, ``checkpoint_every``, ``progress``).

        Returns:
          ``(late-phase state at num_steps, records of both phases with "phase")``;
          collapse the state with `average`.
        """
        if isinstance(t0, bool) or not isinstance(t0, int) or not 0 <= t0 <= num_steps:
            raise ValueError(f"t0 must be an int in [0, num_steps={num_steps}], got {t0!r}")
        untrained = self.num_members - (num_steps - t0)  # one member per late step
        if self.schedule != "parallel" and untrained > 0:
            warnings.warn(
                f"{num_steps - t0} late-phase steps for K={self.num_members} members: "
                f"{untrained} members are never trained; use num_steps - t0 >= K",
                stacklevel=2,
            )
        batch_size = fit_kwargs.get("batch_size")
        if self.schedule == "parallel" and batch_size and batch_size % self.num_members:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by K={self.num_members} "
                "under schedule='parallel'"
            )
        mode, mesh = fit_kwargs.get("mode", "jit"), fit_kwargs.get("mesh")
        if mode not in training.MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {training.MODES}")
        if eval_fn is None and isinstance(data, ws_data.Dataset):
            if apply_fn is None:
                raise ValueError("fit on a Dataset needs apply_fn (default evaluation) or eval_fn")
            eval_fn = training.classification_eval(
                apply_fn,
                data,
                train_eval_examples=fit_kwargs.get("train_eval_examples", 1000),
                mode=mode,
                mesh=mesh,
            )
        sub = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
        history = []
        plain_step, late_step = _steps(self, loss_fn, tx, mode, mesh, shard_members)
        if t0 > 0:
            state, hist = training.fit(
                state,
                plain_step,
                data,
                num_steps=t0,
                eval_fn=eval_fn,
                workdir=sub("plain"),
                **fit_kwargs,
            )
            history += [{**r, "phase": "plain"} for r in hist]
        late_state = self.expand_state(state, tx, key=key, masks=masks)
        late_dir = sub("late")
        if late_dir and jax.process_index() == 0 and not os.path.exists(late_dir):
            os.makedirs(late_dir)  # a fresh late phase starts at t0 with an empty history
            io.write_jsonl(os.path.join(late_dir, "metrics.jsonl"), [])
        if not isinstance(data, ws_data.Dataset) and iter(data) is data:  # one-shot: continue
            data = itertools.chain(itertools.repeat({}, int(state.step)), data)
        late_state, hist = training.fit(
            late_state,
            late_step,
            data,
            num_steps=num_steps,
            eval_fn=None if eval_fn is None else (lambda s: eval_fn(self.average_state(s))),
            workdir=sub("late"),
            **{**fit_kwargs, "tx_args": self._late_tx_args(fit_kwargs.get("tx_args"))},
        )
        history += [{**r, "phase": "late"} for r in hist]
        return late_state, history

    def _late_tx_args(self, tx_args):
        """``tx_args`` of the late phase: per-step ``masks`` laid out on the member axis."""

        def expand(args):
            if args and "masks" in args:
                return {**args, "masks": self.expand_masks(args["masks"])}
            return args

        return (lambda batch: expand(tx_args(batch))) if callable(tx_args) else expand(tx_args)

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
