"""Flatness along random filter-normalised directions (Li et al. 2018, arXiv 1712.09913)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from wspace.landscape._util import PyTree, _ById, _check_int


def filter_normalized_direction(params: PyTree, key: jax.Array) -> PyTree:
    """A random Gaussian direction with each filter rescaled to the norm of the params' filter.

    ``d_{l,i} ← d_{l,i} / ||d_{l,i}|| · ||θ_{l,i}||`` for every filter ``i`` of every
    kernel ``l``, where a filter is a slice along the **last** axis (flax layout:
    Dense ``(in, out)`` -> a column per output unit; Conv ``(..., in, out)`` -> one
    filter per output channel). Leaves with ``ndim <= 1`` (biases, normalisation
    scales and offsets) get a zero direction (Li et al. 2018, arXiv 1712.09913).

    Args:
      params: the parameter pytree.
      key: PRNG key.

    Returns:
      a pytree shaped like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    return _filter_normalize(params, unravel(jax.random.normal(key, flat.shape, flat.dtype)))


@jax.jit
def _filter_normalize(params: PyTree, noise: PyTree) -> PyTree:
    """Rescales each last-axis slice of ``noise`` to the norm of ``params``'; 1-D leaves -> 0."""

    def leaf(p, d):
        if p.ndim <= 1:
            return jnp.zeros_like(p)
        axes = tuple(range(p.ndim - 1))
        dn = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        pn = jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True))
        return d * pn / jnp.maximum(dn, jnp.finfo(d.dtype).tiny)

    return jax.tree.map(leaf, params, noise)


def flatness(
    f: Callable,
    params: PyTree,
    *,
    key: jax.Array,
    threshold: float = 0.1,
    num_directions: int = 10,
    max_distance: float = 1.0,
    num_steps: int = 20,
    refine_steps: int = 20,
    return_distances: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mean distance along random filter-normalised directions before ``f`` rises by ``threshold``.

    For each of ``num_directions`` directions ``d`` (`filter_normalized_direction`),
    ``t*(d) = min {t > 0 : f(θ + t d) - f(θ) > threshold}`` found by a grid of
    ``num_steps`` equal steps on ``(0, max_distance]`` (the first grid point above the
    threshold) followed by ``refine_steps`` bisection steps inside the bracketing grid
    interval. A direction that never exceeds the threshold within ``max_distance``
    counts as ``max_distance`` (censored). Larger means flatter. ``t`` is in units of
    the weights' own (per-filter) norms, so the measure is invariant to the rescaling
    of ReLU layers (Li et al. 2018, arXiv 1712.09913; the flatness of IMP solutions in
    Saleem et al. 2024, arXiv 2403.15022).

    Args:
      f: ``f(params) -> scalar`` (e.g. the train loss, `classification_objective`).
      params: the point.
      key: PRNG key for the directions.
      threshold: the rise in ``f`` (``> 0``).
      num_directions: number of random directions (``>= 1``).
      max_distance: the largest ``t`` searched (``> 0``).
      num_steps: grid points on ``(0, max_distance]`` (``>= 1``).
      refine_steps: bisection steps (``>= 0``); the error is
        ``max_distance / num_steps / 2**refine_steps``.
      return_distances: also return the ``(num_directions,)`` per-direction distances.

    Returns:
      the mean distance (a scalar array), or ``(mean, distances)``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold={threshold}; must be > 0")
    if not max_distance > 0:
        raise ValueError(f"max_distance={max_distance}; must be > 0")
    _check_int(num_directions, "num_directions", 1)
    _check_int(num_steps, "num_steps", 1)
    _check_int(refine_steps, "refine_steps", 0)
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(key, (num_directions, flat.size), flat.dtype)
    distances = _flatness_distances(
        _ById(f),
        params,
        jax.vmap(unravel)(noise),
        jnp.asarray(threshold, flat.dtype),
        jnp.asarray(max_distance, flat.dtype),
        num_steps=num_steps,
        refine_steps=refine_steps,
    )
    mean = jnp.mean(distances)
    return (mean, distances) if return_distances else mean


@functools.partial(jax.jit, static_argnames=("f", "num_steps", "refine_steps"))
def _flatness_distances(f, params, noise, threshold, max_distance, *, num_steps, refine_steps):
    """Per-direction first-crossing distances; ``noise`` has a leading direction axis."""
    grid = max_distance * jnp.arange(1, num_steps + 1, dtype=threshold.dtype) / num_steps
    base = f(params)

    def one(z):
        d = _filter_normalize(params, z)
        rise = lambda t: f(jax.tree.map(lambda p, di: p + t * di, params, d)) - base
        above = jax.lax.map(rise, grid) > threshold
        first = jnp.argmax(above)
        lo = jnp.where(first > 0, grid[jnp.maximum(first - 1, 0)], 0.0)

        def bisect(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            up = rise(mid) > threshold
            return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

        lo, hi = jax.lax.fori_loop(0, refine_steps, bisect, (lo, grid[first]))
        return jnp.where(jnp.any(above), 0.5 * (lo + hi), max_distance)

    return jax.lax.map(one, noise)
