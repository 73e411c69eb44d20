"""Shared constants, argument checks and tree helpers of `wspace.landscape`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
EIGEN_METHODS = ("lanczos", "power")
PATH_MODES = ("auto", "map", "vmap", "loop")
METRICS = ("loss", "error", "all")
_HIGHEST = jax.lax.Precision.HIGHEST  # ground truths stay exact under TF32 defaults


class _ById:
    """Wraps a callable as a static jit argument hashed by identity: the compiled program is
    reused when the same ``f`` object is passed again with the same shapes (``f`` is assumed
    pure: state it reads from outside its arguments is frozen at the first call)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise ValueError(f"expected a callable f(params); got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ById) and other.fn is self.fn


def _lerp(a, b, alpha):
    """``(1 - α) a + α b`` as ``a + α (b - a)`` for ``α <= 1/2``, ``b - (1 - α)(b - a)`` above."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jnp.where(alpha <= 0.5, a + alpha * (b - a), b - (1 - alpha) * (b - a))


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an int >= {minimum}")


def _check_same_tree(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
    """ValueError unless ``a`` and ``b`` have the same tree structure and leaf shapes."""
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:  # type: ignore[operator]  # jaxlib's PyTreeDef stub
        raise ValueError(f"{name_a} and {name_b} have different tree structures: {ta} vs {tb}")
    for pa, la, lb in zip(
        jax.tree_util.tree_flatten_with_path(a)[0],
        jax.tree.leaves(a),
        jax.tree.leaves(b),
        strict=True,
    ):
        if jnp.shape(la) != jnp.shape(lb):
            raise ValueError(
                f"{name_a} and {name_b} differ at {jax.tree_util.keystr(pa[0])}: "
                f"shape {jnp.shape(la)} vs {jnp.shape(lb)}"
            )


def _check_mask(mask: PyTree | None, like: PyTree) -> PyTree:
    """An all-True mask for ``None``; else check that ``mask`` is boolean and matches ``like``."""
    if mask is None:
        return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), like)
    _check_same_tree(like, mask, "params", "mask")
    for leaf in jax.tree.leaves(mask):
        if jnp.asarray(leaf).dtype != bool:
            raise ValueError(f"mask must be a boolean pytree; got a leaf of dtype {leaf.dtype}")
    return mask


def _zip_leaves(*trees: PyTree):
    return zip(*(jax.tree.leaves(t) for t in trees), strict=True)


def _masked_sum(x, m):
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(jnp.where(m, x, 0))


def _split_keys(keys) -> list:
    """A list of PRNG keys from a sequence or a stacked key array; at least two."""
    if isinstance(keys, jax.Array | np.ndarray):
        typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
        if keys.ndim != (1 if typed else 2):
            raise ValueError(
                f"keys must hold one key per copy (a stacked key array); got shape {keys.shape}"
            )
        keys = list(keys)
    elif isinstance(keys, Sequence):
        keys = list(keys)
    else:
        raise ValueError(f"keys must be a sequence or stacked array of keys; got {type(keys)}")
    if len(keys) < 2:
        raise ValueError(f"instability needs at least 2 keys (copies); got {len(keys)}")
    return keys
