"""The tree layout of late-phase weights: which leaves are members, expansion, averaging.

Internals of `wspace.late_phase` (public names are re-exported there): selections of
weights by param path (bool pytrees from `wspace.paths.select`), the member axis
(copies or rank-1 factors), member extraction, and the weight-space average
(BatchNorm affine maps averaged exactly).

Reference: von Oswald et al. 2021, arXiv 2007.12927; rank-1 factors: Wen et al. 2020,
arXiv 2002.06715.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from wspace import paths

PyTree = Any
PRESETS = ("bn_head", "batchnorm", "head", "rank1")
_R_IN, _R_OUT = "_rank1_in", "_rank1_out"


# ----------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which weights are late-phase, and how they are replicated.

    Attributes:
      predicate: ``predicate(path) -> bool`` on a param path, a tuple of
        strings such as ``("BatchNorm_0", "scale")`` or ``("head", "kernel")``
        (the components of the `wspace.paths` name ``"BatchNorm_0/scale"``).
      rank1: False: the chosen leaves themselves get a member axis (copies).
        True: each chosen kernel (ndim >= 2) stays shared and gets per-member
        rank-1 multiplicative factors ``W * (r s^T)``.
      name: a label (the preset's name or ``"custom"``).
    """

    predicate: Callable[[tuple[str, ...]], bool]
    rank1: bool = False
    name: str = "custom"

    def chosen(self, params: PyTree) -> PyTree:
        """The bool pytree of the plain ``params`` leaves that become members (rank-1:
        the chosen kernels, ndim >= 2, that get factors)."""
        kernel = lambda x: not self.rank1 or jnp.ndim(x) >= 2
        return paths.select(params, lambda name, x: self._picks(name) and kernel(x))

    def members(self, late_params: PyTree) -> PyTree:
        """The bool pytree of the leaves of a *late-phase* tree that carry the member axis."""
        if self.rank1:
            return paths.select(late_params, lambda name, _: name.endswith((_R_IN, _R_OUT)))
        return paths.select(late_params, lambda name, _: self._picks(name))

    def _picks(self, name: str) -> bool:
        return bool(self.predicate(tuple(name.split("/"))))


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


def _check_k(num_members) -> int:
    if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members K must be an int >= 1, got {num_members!r}")
    return num_members


def _no_selection_error(tree, sel: Selection) -> ValueError:
    names = paths.named_leaves(tree)[0]
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    what = "kernels (ndim >= 2)" if sel.rank1 else "leaves"
    return ValueError(
        f"late-phase selection {sel.name!r} selects no {what} of the params; "
        f"allowed: a predicate true for at least one of: {shown}"
    )


# ----------------------------------------------------------------------------- expand, average


@functools.partial(jax.jit, static_argnames=("sel", "k_members", "noise"))
def _expand(params: PyTree, key: jax.Array, *, sel: Selection, k_members: int, noise: float):
    """The late-phase layout of ``params`` (see `LatePhase.expand`)."""
    chosen = sel.chosen(params)
    if not any(jax.tree.leaves(chosen)):
        raise _no_selection_error(params, sel)
    if sel.rank1:
        late = _add_rank1(params, chosen, k_members)
    else:
        copies = lambda x, c: jnp.broadcast_to(x, (k_members,) + jnp.shape(x)) if c else x
        late = jax.tree.map(copies, params, chosen)
    return _add_noise(late, sel.members(late), key, noise)


def _add_noise(late, members, key, noise: float):
    """``x + noise * N(0, 1)`` on the member leaves: one draw for all of them, split by leaf."""
    if noise == 0:
        return late
    leaves, treedef = jax.tree.flatten(late)
    idx = [i for i, m in enumerate(jax.tree.leaves(members)) if m]
    eps = jax.random.normal(key, (sum(leaves[i].size for i in idx),))
    start = 0
    for i in idx:
        x = leaves[i]
        leaves[i] = x + noise * eps[start : start + x.size].reshape(x.shape).astype(x.dtype)
        start += x.size
    return jax.tree.unflatten(treedef, leaves)


def _add_rank1(params, chosen, k_members):
    """``params`` with factors ``<kernel>_rank1_in`` (K, in) and ``<kernel>_rank1_out``
    (K, out), all ones, beside every chosen kernel (nested dicts walked with ``chosen``)."""
    if not isinstance(params, Mapping):
        raise ValueError(
            f"rank-1 late-phase weights need params as nested dicts; found {type(params).__name__}"
        )
    taken = set(paths.named_leaves(params)[0])
    for name, picked in paths.leaves_by_name(chosen).items():
        clash = sorted({name + _R_IN, name + _R_OUT} & taken)
        if picked and clash:
            raise ValueError(f"params already hold {clash[0]}, the name of a rank-1 factor")

    def add(tree, picks):
        out = {}
        for name, value in tree.items():
            out[name] = add(value, picks[name]) if isinstance(value, Mapping) else value
            if picks[name] is True:  # a chosen leaf (a subtree's picks are a dict)
                out[name + _R_IN] = jnp.ones((k_members, value.shape[-2]), value.dtype)
                out[name + _R_OUT] = jnp.ones((k_members, value.shape[-1]), value.dtype)
        return out

    return add(params, chosen)


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
    members = sel.members(params)
    if sel.rank1:
        avg = _fold_rank1(params, lambda r, s: _mean0(r[:, :, None] * s[:, None, :]))
    else:
        avg = jax.tree.map(lambda x, m: _mean0(x) if m else x, params, members)
    named, is_member = paths.leaves_by_name(params), paths.leaves_by_name(members)
    new_params, new_stats = _average_bns(named, is_member, paths.leaves_by_name(model_state), eps)
    avg = paths.label_tree(avg, lambda n, x: new_params.get(n, x))
    return avg, paths.label_tree(model_state, lambda n, x: new_stats.get(n, _mean0(x)))


def _average_bns(params, is_member, stats, eps):
    """The averaged leaves of every BatchNorm layer, by name: ``scale``, ``bias`` of
    ``params`` and ``mean``, ``var`` of the model state (``<collection>/<layer>/mean``)."""
    new_params, new_stats = {}, {}
    for mean in stats:
        node = mean.removesuffix("/mean")
        var = node + "/var"
        if node == mean or var not in stats:
            continue
        layer = node.partition("/")[2]  # the layer's path in params: the collection dropped
        scale, bias = _join(layer, "scale"), _join(layer, "bias")
        if scale not in params or bias not in params:
            found = [n for n in params if n.startswith(layer + "/")] if layer else list(params)
            raise ValueError(
                f"BatchNorm statistics at {node} need 'scale' and 'bias' params at "
                f"{layer or 'the top level'} to average the affine maps; found {found}"
            )
        k_members = stats[mean].shape[0]
        scale_k, bias_k = (_per_member(params[n], is_member[n], k_members) for n in (scale, bias))
        new = _average_bn(scale_k, bias_k, stats[mean], stats[var], eps)
        new_params[scale], new_params[bias], new_stats[mean], new_stats[var] = new
    return new_params, new_stats


def _per_member(x, is_member: bool, k_members: int):
    """``x`` with the member axis: itself for a member leaf, K copies for a shared one."""
    return x if is_member else jnp.broadcast_to(x, (k_members,) + x.shape)


def _join(layer: str, leaf: str) -> str:
    return f"{layer}/{leaf}" if layer else leaf


def _average_bn(scale, bias, mean, var, eps):
    """``(scale*, bias*, mean*, var*)`` of one BatchNorm layer's K members, shape (K, C)."""
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
