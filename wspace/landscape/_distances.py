"""Distances between solutions: L2, cosine similarity (optionally masked), mask overlap."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wspace.landscape._util import PyTree, _check_mask, _check_same_tree, _masked_sum, _zip_leaves


def l2_distance(a: PyTree, b: PyTree, mask: PyTree | None = None) -> jax.Array:
    """Euclidean distance ``||a - b||₂`` of two pytrees flattened to vectors.

    Args:
      a, b: pytrees of the same structure and shapes.
      mask: optional boolean pytree of the same structure; only entries where it is
        ``True`` count (e.g. the surviving weights of a pruning mask).

    Returns:
      a scalar array.
    """
    _check_same_tree(a, b, "a", "b")
    mask = _check_mask(mask, a)
    sq = [_masked_sum((x - y) ** 2, m) for x, y, m in _zip_leaves(a, b, mask)]
    return jnp.sqrt(sum(sq, jnp.zeros((), jnp.float32)))


def cosine_similarity(a: PyTree, b: PyTree, mask: PyTree | None = None) -> jax.Array:
    """Cosine of the angle between two pytrees flattened to vectors, ``<a, b> / (|a| |b|)``.

    Args:
      a, b: pytrees of the same structure and shapes.
      mask: optional boolean pytree; only entries where it is ``True`` count.

    Returns:
      a scalar array in ``[-1, 1]``; ``nan`` when either vector is zero.
    """
    _check_same_tree(a, b, "a", "b")
    mask = _check_mask(mask, a)
    zero = jnp.zeros((), jnp.float32)
    leaves = list(_zip_leaves(a, b, mask))
    dot = sum((_masked_sum(x * y, m) for x, y, m in leaves), zero)
    na = sum((_masked_sum(x * x, m) for x, _, m in leaves), zero)
    nb = sum((_masked_sum(y * y, m) for _, y, m in leaves), zero)
    denom = jnp.sqrt(na) * jnp.sqrt(nb)
    return jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def mask_overlap(mask_a: PyTree, mask_b: PyTree) -> jax.Array:
    """Jaccard index of two boolean masks: ``|A ∩ B| / |A ∪ B|``.

    1 for identical masks (also when both are empty), 0 for disjoint ones; the
    mask-similarity measure of lottery-ticket studies (e.g. Frankle et al. 2020,
    arXiv 1912.05671).

    Args:
      mask_a, mask_b: boolean pytrees of the same structure and shapes.

    Returns:
      a scalar float array.
    """
    _check_same_tree(mask_a, mask_b, "mask_a", "mask_b")
    for name, m in (("mask_a", mask_a), ("mask_b", mask_b)):
        bad = [jnp.asarray(x).dtype for x in jax.tree.leaves(m) if jnp.asarray(x).dtype != bool]
        if bad:
            raise ValueError(f"{name} must be a boolean pytree; got leaves of dtype {bad[0]}")
    pairs = list(_zip_leaves(mask_a, mask_b))
    inter = sum((jnp.sum(x & y) for x, y in pairs), jnp.zeros((), jnp.int32))
    union = sum((jnp.sum(x | y) for x, y in pairs), jnp.zeros((), jnp.int32))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)
