"""The late-phase optax wrapper: who trains on a minibatch, and the optimizer state at T0.

Internals of `wspace.late_phase` (`LatePhase.optimizer` and `LatePhase.expand_opt_state`
call these). The wrapper owns the member schedule the way ``optax.MultiSteps`` owns its
accumulation: its state counts the late-phase steps (and holds the key of the random
schedule), the step reads the active member from it (`member_index`) before computing
gradients, and ``update`` moves only that member's rows and, when due, the shared
weights.

The expansion contract (`expand_opt_state`): which weights are members is a function of
the params (`wspace.late_phase.Selection`, as ``optax.masked``'s mask); every node of
``tx``'s state that has the params' tree structure is a per-weight part and is laid out
like the late-phase params. Member leaves get K copies of the plain leaf's part (or of
``tx.init``'s with fresh member state), shared leaves keep theirs, and new rank-1 factor
leaves start where ``tx.init`` starts them: ``True`` in boolean parts (the masks bound in
`wspace.pruning.keep_masked` / `mask_gradients`: factors are never pruned), the factor
itself in an `wspace.averaging.SWAState` mean (an average starts at the params), and
zero in every other part (momenta, Adam moments, traces). Everything else (counts,
schedules, injected hyperparameters) is kept, so learning-rate schedules continue.

Reference: von Oswald et al. 2021, arXiv 2007.12927 (Algorithm 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wspace import averaging, paths

if TYPE_CHECKING:  # the spec's class imports this module
    from wspace.late_phase import LatePhase

PyTree = Any
MEMBER_OPT_STATES = ("copy", "fresh")


class LatePhaseState(NamedTuple):
    """State of `LatePhase.optimizer`.

    Attributes:
      count: late-phase steps taken (int32); the cycle schedule's member is ``count mod K``.
      key: PRNG key of the random schedule (member ``randint(fold_in(key, count))``).
      inner: the wrapped ``tx``'s state over the late-phase params.
      accum: running sum of the shared weights' gradients in the current cycle
        (``combine`` ``"sum"``/``"mean"`` under cycle/random; ``()`` otherwise).
    """

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    key: jax.Array
    inner: PyTree
    accum: PyTree


def member_index(spec: LatePhase, state: LatePhaseState) -> jax.Array | None:
    """The active member of the next step: ``count mod K`` (cycle), uniform (random).

    None under ``"parallel"`` (every member is active).
    """
    if spec.schedule == "cycle":
        return jnp.mod(state.count, spec.num_members).astype(jnp.int32)
    if spec.schedule == "random":
        key = jax.random.fold_in(state.key, state.count)
        return jax.random.randint(key, (), 0, spec.num_members)
    return None


def zero_accum(spec: LatePhase, late_params: PyTree) -> PyTree:
    if not spec.accumulates:
        return ()
    zero = lambda x, m: jnp.zeros((), x.dtype) if m else jnp.zeros_like(x)
    return jax.tree.map(zero, late_params, spec.select.members(late_params))


def optimizer(
    spec: LatePhase, tx: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """``tx`` wrapped so that a step moves only the active member and, when due, the shared
    weights (see `LatePhase.optimizer`)."""
    scale = 1.0 if spec.combine == "sum" else 1.0 / spec.num_members

    def init_fn(late_params):
        key = jax.random.PRNGKey(0)
        return LatePhaseState(
            jnp.zeros((), jnp.int32), key, tx.init(late_params), zero_accum(spec, late_params)
        )

    def update_fn(grads, state, params=None, **extra_args):
        member = member_index(spec, state)
        is_m = spec.select.members(grads)
        boundary: bool | jax.Array = True  # a traced bool when accumulating
        accum, g_in = state.accum, grads
        if spec.accumulates:
            boundary = jnp.mod(state.count + 1, spec.num_members) == 0
            accum = jax.tree.map(lambda a, g, m: a if m else a + g, state.accum, grads, is_m)
            g_in = jax.tree.map(lambda g, a, m: g if m else a * scale, grads, accum, is_m)
            accum = jax.tree.map(
                lambda a, m: a if m else jnp.where(boundary, jnp.zeros_like(a), a), accum, is_m
            )
        updates, inner = tx.update(g_in, state.inner, params, **extra_args)
        zeros = jax.tree.map(jnp.zeros_like, updates)
        updates = keep_rows(spec, updates, zeros, is_m, member, boundary)
        inner = _select_state(spec, inner, state.inner, grads, member, boundary)
        if params is not None:  # SWA means of the iterates really taken (rows held above)
            inner = _swa_of(inner, state.inner, optax.apply_updates(params, updates))
        count = optax.safe_int32_increment(state.count)
        return updates, LatePhaseState(count, state.key, inner, accum)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_rows(
    spec: LatePhase,
    new: PyTree,
    old: PyTree,
    members: PyTree,
    member: jax.Array | None,
    take_shared: bool | jax.Array,
) -> PyTree:
    """Rows of the active member (all rows if member is None) and, if ``take_shared``,
    shared leaves from ``new``; everything else from ``old`` (bit for bit). ``members``:
    the bool pytree of the leaves that carry the member axis."""
    k_members = spec.num_members

    def one(n, o, is_member):
        if not is_member:
            return n if take_shared is True else jnp.where(take_shared, n, o)
        if member is None:
            return n
        rows = (jnp.arange(k_members) == member).reshape((k_members,) + (1,) * (n.ndim - 1))
        return jnp.where(rows, n, o)

    return jax.tree.map(one, new, old, members)


def _select_state(spec, new, old, like, member, take_shared):
    """`keep_rows` on every part of a ``tx`` state shaped like the params; the rest from new."""
    ldef = jax.tree.structure(like)
    members = spec.select.members(like)
    is_l = lambda x: x is not None and jax.tree.structure(x) == ldef  # type: ignore[operator]  # jaxlib's PyTreeDef stub
    new_parts, ndef = jax.tree.flatten(new, is_leaf=is_l)
    old_parts = jax.tree.flatten(old, is_leaf=is_l)[0]
    out = [
        keep_rows(spec, n, o, members, member, take_shared) if is_l(n) else n
        for n, o in zip(new_parts, old_parts, strict=True)
    ]
    return jax.tree.unflatten(ndef, out)


def _swa_of(new, old, new_params):
    """Redoes every `wspace.averaging.swa` mean in ``new`` on the params actually reached.

    Inside ``tx``, SWA saw ``params + updates`` before the inactive members' rows and the
    held shared weights were reset; its ``n`` (iterates averaged) is right, so the mean
    is ``old.mean + [n grew] (new_params - old.mean) / n``: the contract's rule for an
    average of iterates, the one bound state whose rows move when their weights do not.
    """
    is_swa = lambda x: isinstance(x, averaging.SWAState)

    def fix(n, o):
        if not is_swa(n):
            return n
        w = jnp.where(n.n > o.n, 1.0 / jnp.maximum(n.n, 1), 0.0)
        mean = jax.tree.map(
            lambda m, p: (m + w.astype(m.dtype) * (p - m)).astype(m.dtype), o.mean, new_params
        )
        return n._replace(mean=mean)

    return jax.tree.map(fix, new, old, is_leaf=is_swa)


# ----------------------------------------------------------------------------- expansion


def expand_opt_state(
    spec: LatePhase,
    tx: optax.GradientTransformation,
    opt_state: PyTree,
    params: PyTree,
    late_params: PyTree,
    member_opt_state: str,
) -> PyTree:
    """``tx``'s state of the plain ``params`` laid out over ``late_params`` (module docstring).

    Raises:
      ValueError: ``member_opt_state`` unknown, or ``opt_state`` not ``tx``'s state of
        ``params`` (its parts cannot be lined up with ``tx.init(params)``'s).
    """
    if member_opt_state not in MEMBER_OPT_STATES:
        raise ValueError(
            f"member_opt_state must be one of {MEMBER_OPT_STATES}, got {member_opt_state!r}"
        )
    pdef = jax.tree.structure(params)
    is_part = lambda x: (
        isinstance(x, averaging.SWAState) or (x is not None and jax.tree.structure(x) == pdef)  # type: ignore[operator]  # jaxlib's PyTreeDef stub
    )
    old, odef = jax.tree.flatten(opt_state, is_leaf=is_part)
    fresh = old
    if member_opt_state == "fresh":
        fresh, fdef = jax.tree.flatten(tx.init(params), is_leaf=is_part)
        if fdef != odef:  # type: ignore[operator]  # jaxlib's PyTreeDef stub
            raise ValueError(
                "the optimizer state does not have the structure of tx.init(params); "
                "pass the state of this tx"
            )
    out = [
        _expand_part(spec, o, f, late_params) if is_part(o) else o
        for o, f in zip(old, fresh, strict=True)
    ]
    expanded = jax.tree.unflatten(odef, out)
    _check_layout(tx, expanded, late_params)
    return expanded


def _check_layout(tx, expanded, late_params) -> None:
    """Refuses a state whose per-weight values are not where ``tx.init(late_params)`` puts
    them (e.g. ``optax.masked``'s partial trees): ValueError naming the first difference.

    Skipped when ``tx.init`` cannot take the late-phase params at all (masks bound at
    construction, shaped like the plain params): those parts are laid out above.
    """
    spec_of = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    try:
        want = jax.eval_shape(tx.init, jax.tree.map(spec_of, late_params))
    except (ValueError, TypeError):
        return
    got = jax.tree.map(spec_of, expanded)
    want_flat = jax.tree_util.tree_flatten_with_path(want)[0]
    got_flat, got_def = jax.tree_util.tree_flatten_with_path(got)
    if got_def != jax.tree.structure(want):  # type: ignore[operator]  # jaxlib's PyTreeDef stub
        raise ValueError(
            "cannot lay the optimizer state out over the late-phase params: its structure "
            f"differs from tx.init(late_params)'s ({got_def} vs {jax.tree.structure(want)}); "
            "use a tx whose per-weight state is shaped like the params"
        )
    for (path, g), (_, w) in zip(got_flat, want_flat, strict=True):
        if (g.shape, g.dtype) != (w.shape, w.dtype):
            raise ValueError(
                f"cannot lay the optimizer state out over the late-phase params: "
                f"{jax.tree_util.keystr(path)} stays {g.shape} {g.dtype} where tx.init("
                f"late_params) has {w.shape} {w.dtype} (a per-weight part not shaped like "
                "the params, e.g. optax.masked); use a tx whose per-weight state is "
                "shaped like the params"
            )


def _expand_part(spec, part, fresh_part, late_params):
    if isinstance(part, averaging.SWAState):  # the mean starts new factors at the factors
        mean = _lay_out(spec, part.mean, fresh_part.mean, late_params, lambda p: p)
        return part._replace(mean=mean)
    is_bool = all(jnp.asarray(x).dtype == bool for x in jax.tree.leaves(part))
    fill = lambda p: jnp.ones(p.shape, bool) if is_bool else jnp.zeros_like(p)
    return _lay_out(spec, part, fresh_part, late_params, fill)


def _lay_out(spec, part, fresh_part, late_params, fill):
    """One per-weight part on the late-phase layout: member rows from ``fresh_part``."""
    k = spec.num_members
    kept, fresh = paths.leaves_by_name(part), paths.leaves_by_name(fresh_part)
    is_member = paths.leaves_by_name(spec.select.members(late_params))

    def one(name, late_leaf):
        if name not in kept:  # a new rank-1 factor
            return fill(late_leaf)
        if is_member[name]:
            x = jnp.asarray(fresh[name])
            return jnp.broadcast_to(x, (k,) + x.shape)
        return kept[name]

    return paths.label_tree(late_params, one)
