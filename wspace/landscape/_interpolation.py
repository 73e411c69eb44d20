"""Paths between two solutions: interpolation, barrier heights, instability (Frankle 2020)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from wspace.landscape._util import (
    PATH_MODES,
    PyTree,
    _ById,
    _check_int,
    _check_same_tree,
    _lerp,
    _split_keys,
)


def linear_path(
    g: Callable,
    params_a: PyTree,
    params_b: PyTree,
    *,
    num_points: int = 11,
    mode: str = "auto",
) -> tuple[jax.Array, jax.Array | dict[str, jax.Array]]:
    """Evaluates ``g`` along the straight line from ``params_a`` to ``params_b``.

    ``θ(α) = (1 - α) θ_a + α θ_b`` for ``α`` in ``linspace(0, 1, num_points)``
    (linear interpolation, Goodfellow et al. 2015, arXiv 1412.6544; Frankle et al.
    2020, arXiv 1912.05671).

    Args:
      g: ``g(params) -> scalar`` or a dict of scalars (e.g. `classification_objective`
        with ``metric="all"``).
      params_a, params_b: the endpoints, pytrees of the same structure and shapes.
      num_points: number of points including both endpoints (``>= 2``).
      mode: ``"map"`` (`jax.lax.map`, one point at a time, jitted), ``"vmap"`` (all
        points at once: fastest, most memory), ``"loop"`` (a Python loop: for ``g``
        that cannot be traced, e.g. one calling ``float``), or ``"auto"`` (``"map"``,
        falling back to ``"loop"`` when ``g`` cannot be traced).

    Returns:
      ``(alphas, values)``: ``(num_points,)`` arrays, or ``values`` a dict of such
      arrays when ``g`` returns a dict.
    """
    _check_int(num_points, "num_points", 2)
    if mode not in PATH_MODES:
        raise ValueError(f"mode={mode!r}; use one of {PATH_MODES}")
    _check_same_tree(params_a, params_b, "params_a", "params_b")
    alphas = jnp.linspace(0.0, 1.0, num_points)
    if mode in ("auto", "map"):
        try:
            values = _path_values(_ById(g), params_a, params_b, alphas, vectorize=False)
        except jax.errors.JAXTypeError:
            if mode == "map":
                raise
            mode = "loop"
    if mode == "vmap":
        values = _path_values(_ById(g), params_a, params_b, alphas, vectorize=True)
    if mode == "loop":
        outs = [_point(g, params_a, params_b, float(al)) for al in np.asarray(alphas)]
        values = jax.tree.map(lambda *xs: jnp.asarray(np.array(xs)), *outs)
    return alphas, values


def _point(g: Callable, params_a, params_b, alpha):
    """``g`` at ``(1 - α) a + α b``; exact at both ends, and everywhere when ``a == b``."""
    return g(jax.tree.map(lambda a, b: _lerp(a, b, alpha), params_a, params_b))


@functools.partial(jax.jit, static_argnames=("g", "vectorize"))
def _path_values(g: Callable, params_a, params_b, alphas, *, vectorize: bool):
    at = functools.partial(_point, g, params_a, params_b)
    return jax.vmap(at)(alphas) if vectorize else jax.lax.map(at, alphas)


def barrier_height(values: ArrayLike | Mapping[str, ArrayLike]) -> jax.Array | dict[str, jax.Array]:
    """Loss (or error) barrier along a path: ``max_α v(α) - (v(0) + v(1)) / 2``.

    Frankle et al. 2020, arXiv 1912.05671 (their "instability" when the endpoints are
    two copies trained from one point). Zero or negative: linearly mode-connected.

    Args:
      values: ``(num_points,)`` values along a path (endpoints first and last, at
        least two), or a dict of such arrays.

    Returns:
      a scalar array, or a dict of them.
    """
    if isinstance(values, dict):
        return {name: cast(jax.Array, barrier_height(v)) for name, v in values.items()}
    values = jnp.asarray(values)
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(f"values must be 1-D with at least 2 points; got shape {values.shape}")
    return jnp.max(values) - 0.5 * (values[0] + values[-1])


def linear_barrier(
    g: Callable, params_a: PyTree, params_b: PyTree, *, num_points: int = 11, mode: str = "auto"
) -> dict:
    """`linear_path` plus its `barrier_height` (Frankle et al. 2020, arXiv 1912.05671).

    Args:
      g: ``g(params) -> scalar`` or dict of scalars.
      params_a, params_b: the endpoints.
      num_points: points on the line including the endpoints (``>= 2``); use an odd
        number so that the midpoint is on the grid.
      mode: see `linear_path`.

    Returns:
      ``{"alphas", "values", "barrier"}`` (``values``/``barrier`` dicts when ``g``
      returns a dict).
    """
    alphas, values = linear_path(g, params_a, params_b, num_points=num_points, mode=mode)
    return {"alphas": alphas, "values": values, "barrier": barrier_height(values)}


def instability(
    train_fn: Callable,
    eval_fn: Callable,
    params: PyTree,
    *,
    keys: jax.Array | Sequence[jax.Array],
    num_points: int = 11,
    mode: str = "auto",
) -> dict:
    """Instability to SGD noise: the barrier between copies trained from one point.

    Trains ``n >= 2`` copies ``θ_i = train_fn(params, key_i)`` (same start, different
    data order / noise) and measures ``barrier_height`` of ``eval_fn`` on the line
    between every pair; the instability is the mean over pairs (Frankle et al. 2020,
    arXiv 1912.05671, who use two copies and the test error).

    Args:
      train_fn: ``train_fn(params, key) -> params``, e.g. a closure over
        `wspace.training.fit` that seeds the data order with ``key``.
      eval_fn: ``g(params) -> scalar`` or dict of scalars (e.g.
        `classification_objective` with ``metric="all"``).
      params: the common starting point.
      keys: a sequence (or stacked array) of at least two PRNG keys, one per copy.
      num_points: points on each line (``>= 2``).
      mode: see `linear_path`.

    Returns:
      ``{"barrier"``: mean barrier over pairs (a dict when ``eval_fn`` returns one),
      ``"pair_barriers"``: ``{(i, j): barrier}``, ``"alphas"``, ``"values"``: the path
      between copies 0 and 1, ``"params"``: the list of trained copies``}``.
    """
    keys = _split_keys(keys)
    _check_int(num_points, "num_points", 2)
    finals = [train_fn(params, k) for k in keys]
    for i, p in enumerate(finals):
        _check_same_tree(params, p, "params", f"train_fn(params, keys[{i}])")
    pair_barriers: dict[tuple[int, int], Any] = {}
    first: dict = {}  # the path between copies 0 and 1
    for i, j in itertools.combinations(range(len(finals)), 2):
        res = linear_barrier(eval_fn, finals[i], finals[j], num_points=num_points, mode=mode)
        pair_barriers[(i, j)] = res["barrier"]
        first = first or res
    barrier = jax.tree.map(lambda *b: jnp.mean(jnp.stack(b)), *pair_barriers.values())
    return {
        "barrier": barrier,
        "pair_barriers": pair_barriers,
        "alphas": first["alphas"],
        "values": first["values"],
        "params": finals,
    }
