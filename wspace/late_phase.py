"""Late-phase weights: an ensemble on a small subset of weights, averaged into one network.

Late in training (step ``T0``) a small subset of the weights -- BatchNorm
scale/shift and the classifier ``head`` in the paper -- is replicated into K
members; the rest stays shared. Each step all K members run at once under
`jax.vmap` over a leading *member axis*, member k on slice k of the
minibatch; the shared weights receive the members' gradients combined by
``combine`` (mean or sum). At the end the members are averaged in weight
space into one ordinary network (`average`).

Representation: a *late-phase params* tree is the plain params tree in which
the chosen leaves carry a leading member axis of size K (``copy`` selections),
or, for ``rank1`` selections, every chosen kernel ``W`` (shape ``(..., in,
out)``) stays shared and gains two sibling leaves ``<name>_rank1_in`` (K, in)
and ``<name>_rank1_out`` (K, out): member k uses ``W * (r_k s_k^T)``
(BatchEnsemble, Wen et al. 2020, arXiv 2002.06715). The rank-1 factors are
applied by transforming the params before calling the *unchanged* loss/apply
function (``W_eff = W * r s^T`` per member), so any flax model works without
changes to its code. ``model_state`` (BatchNorm ``batch_stats``) gets a member
axis on every leaf: batch statistics are per member.

Gradient combination (one backward pass, any model): the wrapped loss is the
mean of the member losses ``L = 1/K sum_k L_k``; its gradient is rescaled
in the backward pass so that member weights get ``dL_k/dphi_k`` (what SGD on
member k alone would get) and shared weights get ``1/K sum_k dL_k/dtheta``
(``combine="mean"``: the plain gradient of the whole minibatch) or ``sum_k
dL_k/dtheta`` (``combine="sum"``, the paper's CIFAR code; for plain SGD this
equals ``"mean"`` with a K-times larger learning rate on the shared weights).

Reference: von Oswald, Kobayashi, Meulemans, Henning, Grewe, Sacramento,
"Neural networks with late-phase weights", ICLR 2021, arXiv 2007.12927.
SWA: Izmailov et al. 2018, arXiv 1803.05407.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wspace import training

PyTree = Any
PRESETS = ("bn_head", "batchnorm", "head", "rank1")
COMBINE = ("mean", "sum")
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


_path = training.key_names


def _paths(tree) -> list[tuple[str, ...]]:
    return [_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_member_path(path: tuple[str, ...], sel: Selection) -> bool:
    """Does this leaf of a *late-phase* tree carry the member axis?"""
    if sel.rank1:
        return path[-1].endswith(_R_IN) or path[-1].endswith(_R_OUT)
    return bool(sel.predicate(path))


def member_axes(late_params: PyTree, select="bn_head") -> PyTree:
    """The vmap ``in_axes`` of a late-phase params tree: 0 on member leaves, None on shared ones."""
    sel = selection(select)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: 0 if _is_member_path(_path(kp), sel) else None, late_params
    )


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


# ----------------------------------------------------------------------------- expand


@functools.partial(jax.jit, static_argnames=("select", "num_members", "noise"))
def expand(
    params: PyTree,
    select: str | Callable | Selection,
    num_members: int,
    *,
    key: jax.Array | None = None,
    noise: float = 0.0,
) -> PyTree:
    """Gives the chosen weights a leading member axis of size K; the rest stays shared.

    Copies: ``phi_k = phi + noise * eps_k``, ``eps_k ~ N(0, 1)``. Rank-1:
    ``r_k = 1 + noise * eps``, ``s_k = 1 + noise * eps'`` (so with
    ``noise=0`` every member equals the plain network exactly).

    Args:
      params: the plain params tree (nested dicts for ``rank1``).
      select: preset name, path predicate or `Selection` (see `selection`).
      num_members: K >= 1.
      key: PRNG key, required when ``noise > 0``.
      noise: standard deviation of the members' initial perturbation.

    Returns:
      The late-phase params tree.

    Reference: von Oswald et al. 2021, arXiv 2007.12927 (Sec. 2).
    """
    sel = selection(select)
    k_members = _check_k(num_members)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise > 0 and key is None:
        raise ValueError(f"noise={noise} > 0 needs a PRNG key; got key=None")
    key = jax.random.PRNGKey(0) if key is None else key
    if sel.rank1:
        chosen = [
            p
            for p, x in zip(_paths(params), jax.tree.leaves(params), strict=True)
            if sel.predicate(p) and jnp.ndim(x) >= 2
        ]
        if not chosen:
            raise _no_selection_error(params, sel)
        return _add_noise(_add_rank1(params, (), sel, k_members), sel, key, noise)

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not any(sel.predicate(_path(kp)) for kp, _ in flat):
        raise _no_selection_error(params, sel)
    leaves = [
        jnp.broadcast_to(x, (k_members,) + jnp.shape(x)) if sel.predicate(_path(kp)) else x
        for kp, x in flat
    ]
    return _add_noise(jax.tree.unflatten(jax.tree.structure(params), leaves), sel, key, noise)


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


def expand_model_state(model_state: PyTree, num_members: int) -> PyTree:
    """Per-member copies of the non-param collections (BatchNorm ``batch_stats``): axis 0 = K."""
    k_members = _check_k(num_members)
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (k_members,) + jnp.shape(x)), model_state
    )


def expand_opt_state(
    tx: optax.GradientTransformation,
    opt_state: PyTree,
    params: PyTree,
    late_params: PyTree,
    select="bn_head",
    *,
    reset: bool = False,
) -> PyTree:
    """Carries an optimizer state of the plain params over to the late-phase params.

    Every sub-tree of ``opt_state`` shaped like ``params`` (momenta, Adam
    moments, SWA means...) becomes a late-phase tree: member leaves get K
    copies of the plain leaf's state, shared leaves keep theirs, new rank-1
    factors get ``tx.init``'s fresh state. Everything else (step counts,
    schedules' counters, injected hyperparameters) is kept as it is, so
    learning-rate schedules continue from where they were.

    Args:
      tx: the optax transformation that made ``opt_state``.
      opt_state: its state for ``params``.
      params: the plain params.
      late_params: ``expand(params, select, K, ...)``.
      select: the same selection as for `expand`.
      reset: ignore ``opt_state`` and return ``tx.init(late_params)``.

    Returns:
      An optimizer state for ``late_params``.

    Raises:
      ValueError: when the two states do not line up (then use ``reset=True``).
    """
    sel = selection(select)
    fresh = tx.init(late_params)
    if reset:
        return fresh
    pdef, ldef = jax.tree.structure(params), jax.tree.structure(late_params)
    is_p = lambda x: jax.tree.structure(x) == pdef
    is_l = lambda x: jax.tree.structure(x) == ldef
    old, _ = jax.tree.flatten(opt_state, is_leaf=is_p)
    new, new_def = jax.tree.flatten(fresh, is_leaf=is_l)
    if len(old) != len(new):
        raise ValueError(
            f"cannot line up the optimizer state of the plain params ({len(old)} parts) with a "
            f"fresh one for the late-phase params ({len(new)} parts); pass reset=True"
        )
    out = []
    for o, n in zip(old, new, strict=True):
        if is_p(o) and is_l(n):
            out.append(_expand_like(o, n, sel))
        elif not is_p(o) and not is_l(n) and jnp.shape(o) == jnp.shape(n):
            out.append(o)
        else:
            raise ValueError(
                f"optimizer state parts differ: {jax.tree.structure(o)} vs "
                f"{jax.tree.structure(n)}; pass reset=True"
            )
    return jax.tree.unflatten(new_def, out)


def _expand_like(plain_tree, fresh_late, sel: Selection):
    """A plain-shaped tree (e.g. a momentum) laid out like ``fresh_late``."""
    by_path = dict(zip(_paths(plain_tree), jax.tree.leaves(plain_tree), strict=True))

    def one(kp, fresh):
        p = _path(kp)
        if p not in by_path:  # a new rank-1 factor
            return fresh
        x = by_path[p]
        if _is_member_path(p, sel):
            return jnp.broadcast_to(x, jnp.shape(fresh)).astype(jnp.result_type(fresh))
        return x

    return jax.tree_util.tree_map_with_path(one, fresh_late)


def expand_state(
    state: training.TrainState,
    tx: optax.GradientTransformation,
    select,
    num_members: int,
    *,
    key: jax.Array | None = None,
    noise: float = 0.0,
    reset_opt_state: bool = False,
) -> training.TrainState:
    """`expand` params, `expand_model_state` and `expand_opt_state` of a `TrainState` at T0."""
    late = expand(state.params, select, num_members, key=key, noise=noise)
    return state.replace(
        params=late,
        model_state=expand_model_state(state.model_state, num_members),
        opt_state=expand_opt_state(
            tx, state.opt_state, state.params, late, select, reset=reset_opt_state
        ),
    )


# ----------------------------------------------------------------------------- members


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


def member(params: PyTree, model_state: PyTree, k: int, select="bn_head"):
    """Member k as a plain network: ``(params_k, model_state_k)`` for the unchanged ``apply``."""
    sel = selection(select)
    axes = member_axes(params, sel)
    p = jax.tree.map(
        lambda x, a: x if a is None else x[k], params, axes, is_leaf=lambda x: x is None
    )
    return _effective(p, sel), jax.tree.map(lambda x: x[k], model_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(x, c):
    return x


def _scale_grad_fwd(x, c):
    return x, None


def _scale_grad_bwd(c, _, g):
    return (g * jnp.asarray(c, g.dtype),)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def late_phase_loss(
    loss_fn: Callable, num_members: int, select="bn_head", *, combine: str = "mean"
) -> Callable:
    """Wraps a library loss so that K members train at once on slices of the minibatch.

    The batch (size B, divisible by K) is split into K contiguous slices;
    ``jax.vmap`` over the member axis runs ``loss_fn`` of member k on slice
    k. The returned loss is ``1/K sum_k L_k``; gradients (by backprop) are
    ``dL_k/dphi_k`` for member k's weights and ``1/K sum_k dL_k/dtheta``
    (``combine="mean"``) or ``sum_k dL_k/dtheta`` (``"sum"``) for shared
    weights ``theta``. For plain SGD, ``"sum"`` equals ``"mean"`` with the
    shared weights' learning rate times K. New ``model_state`` is per member;
    metrics are averaged over members.

    Plug it into the foundation unchanged:
    ``ws.training.make_train_step(late_phase_loss(loss_fn, K), tx)``, with
    the state from `expand_state`.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, metrics))``.
      num_members: K >= 1.
      select: preset name, predicate or `Selection` (as used for `expand`).
      combine: ``"mean"`` or ``"sum"``: how shared weights combine member gradients.

    Returns:
      A loss in the same signature over late-phase params and per-member model_state.

    Reference: von Oswald et al. 2021, arXiv 2007.12927.
    """
    sel = selection(select)
    k_members = _check_k(num_members)
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    shared_scale = 1.0 if combine == "mean" else float(k_members)

    def wrapped(params, model_state, batch, key):
        axes = member_axes(params, sel)
        if not any(a == 0 for a in jax.tree.leaves(axes, is_leaf=lambda x: x is None)):
            raise _no_selection_error(params, sel)
        sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(batch)}
        if len(sizes) != 1 or next(iter(sizes)) % k_members:
            raise ValueError(
                f"batch leading sizes {sorted(sizes)} must be one size divisible by K={k_members}"
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


# ----------------------------------------------------------------------------- average


def _mean0(x):
    """Mean over the member axis, computed as ``x_0 + mean(x - x_0)`` (exact for equal members)."""
    return x[0] + jnp.mean(x - x[0], axis=0)


@functools.partial(jax.jit, static_argnames=("select", "eps"))
def average(
    params: PyTree, model_state: PyTree, select="bn_head", *, eps: float = 1e-5
) -> tuple[PyTree, PyTree]:
    """Collapses the members into one plain network by averaging in weight space.

    Member leaves: ``phi = 1/K sum_k phi_k``; rank-1 kernels: ``W * 1/K sum_k
    r_k s_k^T``. BatchNorm layers (any node of ``model_state`` holding
    ``mean`` and ``var``, with ``scale`` and ``bias`` at the same path in
    ``params``) average their effective affine maps ``y = a_k x + b_k``,
    ``a_k = scale_k / sqrt(var_k + eps)``, ``b_k = bias_k - a_k mean_k``: the
    result keeps the members' mean statistics ``m* = mean_k mean_k``, ``v* =
    mean_k var_k`` as running stats and sets ``scale* = mean_k scale_k
    sqrt(v* + eps) / sqrt(var_k + eps)``, ``bias* = mean_k (bias_k + a_k (m* -
    mean_k))``, so ``a* = mean_k a_k`` and ``b* = mean_k b_k``: the averaged
    layer is the mean of the members' affine maps (equal to the plain
    average of scale/bias when the members' statistics agree, and exactly the
    original network when all members are equal). Other ``model_state``
    leaves are averaged over members.

    Args:
      params: late-phase params (from `expand` and training).
      model_state: per-member model state (from `expand_model_state`).
      select: the selection used for `expand`.
      eps: the BatchNorm epsilon (flax's default 1e-5).

    Returns:
      ``(params, model_state)`` of one plain network for the unchanged ``apply``.

    Reference: von Oswald et al. 2021, arXiv 2007.12927 (weight-space averaging).
    """
    sel = selection(select)
    axes = member_axes(params, sel)
    if sel.rank1:
        avg = _average_rank1(params)
    else:
        avg = jax.tree.map(
            lambda x, a: x if a is None else _mean0(x), params, axes, is_leaf=lambda x: x is None
        )
    is_member = {
        p: a == 0
        for p, a in zip(
            _paths(params), jax.tree.leaves(axes, is_leaf=lambda x: x is None), strict=True
        )
    }
    bn = {}  # path of a BN module -> (scale*, bias*, mean*, var*)
    for path, node in _stat_nodes(model_state):
        bn[path[1:]] = _average_bn(params, path[1:], node, is_member, eps)
    new_state = _replace_stats(model_state, bn)
    avg = _replace_affine(avg, (), bn)
    return avg, new_state


def _average_rank1(tree):
    """The members' mean kernel: ``mean_k W * (r_k s_k^T) = W * mean_k(r_k s_k^T)``."""
    return _fold_rank1(tree, lambda r, s: _mean0(r[:, :, None] * s[:, None, :]))


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


def averaged_apply(apply_fn: Callable, select="bn_head", *, eps: float = 1e-5) -> Callable:
    """``apply(variables, x, **kw)`` of the averaged network, for late-phase ``variables``.

    Lets the foundation's `wspace.training.evaluate` / `fit` evaluate a
    late-phase state: ``variables = {"params": late_params, **model_state}``.
    """

    def apply(variables, x, **kwargs):
        params = variables["params"]
        state = {k: v for k, v in dict(variables).items() if k != "params"}
        p, s = average(params, state, select, eps=eps)
        return apply_fn({"params": p, **s}, x, **kwargs)

    return apply


# ----------------------------------------------------------------------------- SWA


class SWAState(NamedTuple):
    """State of `swa`: steps seen, number of averaged iterates, their running mean."""

    count: jax.Array
    n: jax.Array
    mean: PyTree


def swa(start: int = 0, every: int = 1) -> optax.GradientTransformationExtraArgs:
    """Stochastic weight averaging as an optax transformation that keeps the average in its state.

    Passes updates through unchanged and averages the new iterates
    ``theta_t = params + updates`` for ``t >= start`` with ``(t - start) %
    every == 0`` (t counts updates from 1): ``mean <- mean + (theta_t -
    mean) / n``. Put it last in an ``optax.chain``; read the average with
    `swa_params`. Before the first averaged step the mean is the initial
    params. Works on late-phase params too (the mean has their member axes).

    Args:
      start: first step to average (numeric; may be injected).
      every: averaging period in steps (numeric; may be injected).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; needs ``params`` in ``update``.

    Reference: Izmailov, Podoprikhin, Garipov, Vetrov, Wilson 2018, arXiv 1803.05407.
    """

    def init_fn(params):
        return SWAState(
            count=jnp.zeros((), jnp.int32),
            n=jnp.zeros((), jnp.int32),
            mean=jax.tree.map(lambda x: jnp.array(x, copy=True), params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("swa needs params: call tx.update(updates, state, params)")
        count = state.count + 1
        take = (count >= start) & (jnp.mod(count - start, every) == 0)
        n = state.n + take.astype(jnp.int32)
        weight = jnp.where(take, 1.0 / jnp.maximum(n, 1), 0.0)
        new_params = optax.apply_updates(params, updates)
        mean = jax.tree.map(
            lambda m, p: (m + weight.astype(m.dtype) * (p - m)).astype(m.dtype),
            state.mean,
            new_params,
        )
        return updates, SWAState(count=count, n=n, mean=mean)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_params(opt_state: PyTree) -> PyTree:
    """The running average kept by the (single) `swa` inside an optimizer state."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SWAState))
        if isinstance(s, SWAState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SWAState in the optimizer state, found {len(found)}"
        )
    return found[0].mean


def recompute_batch_stats(
    loss_fn: Callable, params: PyTree, model_state: PyTree, batches: Iterable[dict], *, key=None
) -> PyTree:
    """Re-estimates BatchNorm running statistics for given params (needed after SWA).

    Runs ``loss_fn`` (train mode: BatchNorm updates its running averages with
    its own momentum) over ``batches`` and returns the final ``model_state``;
    with momentum m the old statistics keep weight ``m ** len(batches)``.
    Works with a plain loss or a `late_phase_loss` (per-member statistics).
    """
    if not jax.tree.leaves(model_state):
        return model_state
    key = jax.random.PRNGKey(0) if key is None else key
    step = jax.jit(lambda p, s, b, k: loss_fn(p, s, b, k)[1][0])
    for i, batch in enumerate(batches):
        model_state = step(params, model_state, batch, jax.random.fold_in(key, i))
    return model_state


# ----------------------------------------------------------------------------- fit


def fit(
    state: training.TrainState,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    dataset,
    *,
    apply_fn: Callable,
    num_members: int,
    t0: int,
    num_steps: int,
    batch_size: int,
    select="bn_head",
    combine: str = "mean",
    noise: float = 0.0,
    key: jax.Array | None = None,
    seed: int = 0,
    eval_every: int = 100,
    workdir: str | None = None,
    progress: bool = True,
) -> tuple[training.TrainState, list[dict]]:
    """One run: plain training up to step ``t0``, then late-phase training to ``num_steps``.

    Two compiled steps (plain and late-phase, both `wspace.training.make_train_step`),
    switched once at ``t0`` with `expand_state` (optimizer state carried over
    by `expand_opt_state`). Both phases run through `wspace.training.fit` (same
    data stream, continued); late-phase evaluations use the averaged network.
    With a workdir, the phases write into ``workdir/plain`` and ``workdir/late``
    and a rerun resumes.

    Args:
      state: plain `TrainState` (``init_state``) at step 0 (or resumed).
      loss_fn: the plain loss (library signature).
      tx: optax transformation (its state is expanded at t0).
      dataset, apply_fn, batch_size, seed, eval_every, progress: as `wspace.training.fit`.
      num_members: K >= 1.
      t0: the late-phase start, ``0 <= t0 <= num_steps``.
      num_steps: total steps.
      select, combine: see `late_phase_loss`.
      noise, key: the members' initial perturbation (see `expand`).

    Returns:
      ``(late-phase state at num_steps, evaluation records of both phases)``;
      collapse it with `average`.
    """
    k_members = _check_k(num_members)
    if not isinstance(t0, int) or not 0 <= t0 <= num_steps:
        raise ValueError(f"t0 must be an int in [0, num_steps={num_steps}], got {t0!r}")
    if batch_size % k_members:
        raise ValueError(f"batch_size {batch_size} must be divisible by K={k_members}")
    sub = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
    history = []
    if t0 > 0:
        plain_step = training.make_train_step(loss_fn, tx)
        state, hist = training.fit(
            state,
            plain_step,
            dataset,
            apply_fn=apply_fn,
            num_steps=t0,
            batch_size=batch_size,
            seed=seed,
            eval_every=eval_every,
            workdir=sub("plain"),
            progress=progress,
        )
        history += [{**r, "phase": "plain"} for r in hist]
    late_state = expand_state(state, tx, select, k_members, key=key, noise=noise)
    late_step = training.make_train_step(
        late_phase_loss(loss_fn, k_members, select, combine=combine), tx
    )
    late_state, hist = training.fit(
        late_state,
        late_step,
        dataset,
        apply_fn=averaged_apply(apply_fn, select),
        num_steps=num_steps,
        batch_size=batch_size,
        seed=seed,
        eval_every=eval_every,
        workdir=sub("late"),
        progress=progress,
    )
    history += [{**r, "phase": "late"} for r in hist]
    return late_state, history


def num_late_phase_params(late_params: PyTree, select="bn_head") -> int:
    """Scalars in the member leaves (all K members): the ensemble's extra memory is this."""
    axes = member_axes(late_params, select)
    return sum(
        math.prod(x.shape)
        for x, a in zip(
            jax.tree.leaves(late_params),
            jax.tree.leaves(axes, is_leaf=lambda x: x is None),
            strict=True,
        )
        if a == 0
    )
