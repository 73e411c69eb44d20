"""The tree layout of late-phase weights: which leaves are members, expansion, averaging.

Internals of `wspace.late_phase` (public names are re-exported there): selections of
weights by param path, the member axis (copies or rank-1 factors), member extraction,
and the weight-space average (BatchNorm affine maps averaged exactly).

Reference: von Oswald et al. 2021, arXiv 2007.12927; rank-1 factors: Wen et al. 2020,
arXiv 2002.06715.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
PRESETS = ("bn_head", "batchnorm", "head", "rank1")
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


# ----------------------------------------------------------------------------- expand, average


@functools.partial(jax.jit, static_argnames=("sel", "k_members", "noise"))
def _expand(params: PyTree, key: jax.Array, *, sel: Selection, k_members: int, noise: float):
    """The late-phase layout of ``params`` (see `LatePhase.expand`)."""
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
    # A bias that is exactly zero in every member (pruned) stays exactly zero: the running
    # mean absorbs the shift instead, m* = -b*/a* (the same affine map a* x + b*).
    a_star = _mean0(a)
    fix = jnp.all(bias == 0, axis=0) & (bias_star != 0) & (a_star != 0)
    b_star = _mean0(bias - a * mean)
    m_star = jnp.where(fix, -b_star / jnp.where(fix, a_star, 1.0), m_star)
    return scale_star, jnp.where(fix, 0.0, bias_star).astype(bias_star.dtype), m_star, v_star


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
