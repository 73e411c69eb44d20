"""Judging gradient estimators: bias, variance, MSE and cosine against a reference gradient.

Any estimator with the library's signature (that of `jax.value_and_grad`)::

    estimator(loss_fn, has_aux=True) -> fn(params, model_state, batch, key) -> ((loss, aux), grads)

is judged by drawing ``R`` independent estimates ``g_1 .. g_R`` (one key each)
and comparing them with a reference ``G`` (an exact gradient by `jax.grad`,
exact enumeration, or a closed form). With ``gbar = mean_r g_r``:

* ``bias = ||gbar - G||`` (includes Monte Carlo error of size ``~sqrt(variance/R)``);
  ``bias_squared = ||gbar - G||^2 - variance / R``, unbiased for ``||E g - G||^2``;
* ``variance = 1/(R-1) sum_r ||g_r - gbar||^2`` (trace of the covariance);
* ``mse = 1/R sum_r ||g_r - G||^2`` (= bias^2 + variance in expectation), ``rmse``;
* ``cosine = 1/R sum_r cos(g_r, G)`` and its standard error ``cosine_se``.

`metrics_vs_samples` gives these as functions of the number of samples ``m``
an estimate uses: either means of ``m`` independent calls of one estimator
(one set of ``R * max(m)`` calls, grouped), or an estimator family ``m ->
estimator`` (``num_copies=m`` for ULR, ``m`` samples with a leave-one-out
baseline for REINFORCE). Forward evaluations are reported alongside so that
estimators of different cost compare at equal cost.

Infrastructure: imports no method module.

Reference: the estimator-accuracy protocol of Shekhovtsov, Yanush & Flach 2020
(arXiv 2006.03143, ``gradeval``): relative RMSE and cosine to the exact
gradient against the number of samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
METRICS = (
    "bias",
    "bias_squared",
    "variance",
    "mse",
    "rmse",
    "cosine",
    "cosine_se",
    "relative_bias",
    "relative_rmse",
)


def _rows(estimates: PyTree) -> np.ndarray:
    """``(R, P)`` float64 matrix: one raveled estimate per row."""
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(estimates)
    return np.asarray(flat, np.float64)


def gradient_metrics(estimates: PyTree, reference: PyTree) -> dict[str, float]:
    """Bias, variance, MSE and cosine of ``R`` repeated estimates against a reference gradient.

    With estimates ``g_r`` and reference ``G``: ``bias = ||mean g - G||``,
    ``bias_squared = bias^2 - variance/R`` (unbiased for ``||E g - G||^2``),
    ``variance = 1/(R-1) sum ||g_r - mean g||^2``, ``mse = 1/R sum ||g_r - G||^2``,
    ``cosine = 1/R sum cos(g_r, G)`` (``cosine_se`` its standard error);
    ``relative_*`` divide by ``norm = ||G||``. Computed on the host in float64.

    Args:
      estimates: a pytree like ``reference`` with a leading axis of ``R >= 2`` repeats.
      reference: the reference (exact) gradient.

    Returns:
      dict of floats: the keys of `METRICS` and ``norm``, ``repeats``.

    Reference: Shekhovtsov, Yanush & Flach 2020, arXiv 2006.03143 (gradeval).
    """
    e = np.asarray(ravel_pytree(reference)[0], np.float64)
    leaves = jax.tree.leaves(estimates)
    if not leaves or any(np.ndim(v) < 1 for v in leaves):
        raise ValueError("estimates need a leading axis of repeats on every leaf")
    g = _rows(estimates)
    if g.shape[0] < 2 or g.shape[1] != e.shape[0]:
        raise ValueError(
            f"estimates need a leading axis of >= 2 repeats matching the reference "
            f"({e.shape[0]} entries); got shape {tuple(g.shape)}"
        )
    r = g.shape[0]
    mean = g.mean(0)
    norm = float(np.linalg.norm(e))
    variance = float(np.sum((g - mean) ** 2) / (r - 1))
    bias = float(np.linalg.norm(mean - e))
    mse = float(np.mean(np.sum((g - e) ** 2, 1)))
    cos = (g @ e) / (np.linalg.norm(g, axis=1) * norm + 1e-30)
    tiny = 1e-30
    return {
        "bias": bias,
        "bias_squared": bias**2 - variance / r,
        "variance": variance,
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "cosine": float(np.mean(cos)),
        "cosine_se": float(np.std(cos, ddof=1) / np.sqrt(r)),
        "relative_bias": bias / (norm + tiny),
        "relative_rmse": float(np.sqrt(mse)) / (norm + tiny),
        "norm": norm,
        "repeats": r,
    }


def sample_gradients(
    estimator: Callable,
    loss_fn: Callable,
    params: PyTree,
    model_state: PyTree,
    batch: dict,
    key: jax.Array,
    *,
    repeats: int,
    has_aux: bool = True,
    chunk_size: int | None = None,
    seed_axis: bool = False,
) -> PyTree:
    """``R`` independent estimates ``estimator(loss_fn)(params, model_state, batch, k_r)``, stacked.

    Args:
      estimator: ``estimator(loss_fn, has_aux=...) -> fn`` with the library's signature
        (``jax.value_and_grad`` is one).
      loss_fn, params, model_state, batch: the estimator's arguments.
      key: PRNG key (split into ``repeats`` keys).
      repeats: ``R >= 1``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      chunk_size: estimates computed at once (`jax.lax.map` batch size; None: one vmap).
        The jitted sampler is cached per ``(estimator, loss_fn, has_aux, chunk_size,
        seed_axis)``: pass the same objects to reuse its compilation.
      seed_axis: ``params``, ``model_state`` and ``key`` carry a leading seed axis ``S``
        (`wspace.training.init_states`; ``batch`` is shared): all seeds are drawn by one
        program, and seed ``s``'s slice equals the call on seed ``s`` alone.

    Returns:
      grads with a leading axis of ``R`` (``[S, R, ...]`` with ``seed_axis``).
    """
    if not isinstance(repeats, int | np.integer) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    sampler = _sampler(estimator, loss_fn, has_aux, chunk_size, seed_axis)
    split = functools.partial(jax.random.split, num=int(repeats))
    return sampler(params, model_state, batch, jax.vmap(split)(key) if seed_axis else split(key))


@functools.lru_cache(maxsize=64)
def _sampler(estimator, loss_fn, has_aux, chunk_size, seed_axis):
    """One jitted sampler per (estimator, loss_fn): reused across params, batches and keys."""
    fn = estimator(loss_fn, has_aux=has_aux)

    def run(params, model_state, batch, keys):
        one = lambda k: fn(params, model_state, batch, k)[1]
        if chunk_size is None:
            return jax.vmap(one)(keys)
        return jax.lax.map(one, keys, batch_size=chunk_size)

    return jax.jit(jax.vmap(run, in_axes=(0, 0, None, 0)) if seed_axis else run)


def average_estimator(estimator: Callable, num_samples: int) -> Callable:
    """An ``m``-sample estimator: the mean of ``m`` independent calls of ``estimator``.

    ``g_m = 1/m sum_i g(k_i)`` with ``k_i`` split from the call's key; the loss
    and floating-point aux leaves are averaged too (integer leaves: the first call's).

    Args:
      estimator: ``estimator(loss_fn, has_aux=...) -> fn`` (library signature).
      num_samples: ``m >= 1``.

    Returns:
      An estimator with the same signature.
    """
    if not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    m = int(num_samples)

    def averaged(loss_fn, has_aux=True):
        fn = estimator(loss_fn, has_aux=has_aux)

        def call(params, model_state, batch, key):
            outs = jax.vmap(lambda k: fn(params, model_state, batch, k))(jax.random.split(key, m))
            return jax.tree.map(
                lambda a: jnp.mean(a, 0) if jnp.issubdtype(a.dtype, jnp.inexact) else a[0], outs
            )

        return call

    return averaged


def metrics_vs_samples(
    estimator: Callable,
    loss_fn: Callable,
    params: PyTree,
    model_state: PyTree,
    batch: dict,
    reference: PyTree,
    key: jax.Array,
    *,
    num_samples: Sequence[int] = (1, 2, 4, 8, 16, 32),
    repeats: int = 32,
    has_aux: bool = True,
    family: bool = False,
    evaluations_per_sample: float = 1.0,
    chunk_size: int | None = None,
    seed_axis: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """`gradient_metrics` of an estimator as functions of its number of samples ``m``.

    ``family=False``: the ``m``-sample estimate is the mean of ``m`` independent
    calls of ``estimator``; ``R * max(m)`` calls are drawn once and grouped
    (disjoint groups within each ``m``). ``family=True``: ``estimator(m)`` is the
    ``m``-sample estimator itself (e.g. ``lambda m: ulr(num_copies=m)``), called
    ``R`` times per ``m``.

    Args:
      estimator: an estimator (library signature), or with ``family=True`` a
        function ``m -> estimator``.
      loss_fn, params, model_state, batch: the estimator's arguments.
      reference: the reference gradient.
      key: PRNG key.
      num_samples: the ``m`` values (ints >= 1).
      repeats: ``R >= 2`` independent ``m``-sample estimates per ``m``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      family: see above.
      evaluations_per_sample: forward evaluations one sample costs (per example);
        ``forward_evaluations = m * evaluations_per_sample``.
      chunk_size: passed to `sample_gradients`.
      seed_axis: ``params``, ``model_state``, ``reference`` and ``key`` carry a leading
        seed axis (`sample_gradients`): every seed's estimates come from one program per
        ``m`` (one in all for ``family=False``); the statistics are per seed.

    Returns:
      ``{"num_samples": [...], "forward_evaluations": [...], <metric>: [...] for
      each of METRICS, "norm": float}``; with ``seed_axis`` a list of these, one per seed.
    """
    ms = [int(m) for m in num_samples]
    if not isinstance(repeats, int | np.integer) or repeats < 2 or not ms or min(ms) < 1:
        raise ValueError(
            f"need repeats >= 2 and num_samples >= 1; got repeats={repeats!r}, "
            f"num_samples={tuple(num_samples)}"
        )

    def draw(est, k, r):
        return sample_gradients(
            est, loss_fn, params, model_state, batch, k, repeats=r, has_aux=has_aux,
            chunk_size=chunk_size, seed_axis=seed_axis,
        )  # fmt: skip

    axis = 1 if seed_axis else 0  # the axis of repeats
    if family:
        fold = jax.vmap(jax.random.fold_in, in_axes=(0, None)) if seed_axis else jax.random.fold_in
        estimates = [draw(estimator(m), fold(key, i), repeats) for i, m in enumerate(ms)]
    else:
        singles = jax.tree.map(np.asarray, draw(estimator, key, repeats * max(ms)))
        estimates = [jax.tree.map(lambda v, m=m: _group(v, axis, repeats, m), singles) for m in ms]
    curves = []
    for s in range(len(key)) if seed_axis else [None]:
        mets = [gradient_metrics(_seed(e, s), _seed(reference, s)) for e in estimates]
        curve: dict[str, Any] = {"num_samples": ms}
        curve["forward_evaluations"] = [m * evaluations_per_sample for m in ms]
        curve.update({k: [met[k] for met in mets] for k in METRICS})
        curves.append({**curve, "norm": mets[-1]["norm"]})
    return curves if seed_axis else curves[0]


def _group(v: np.ndarray, axis: int, repeats: int, m: int) -> np.ndarray:
    """Means of ``m`` consecutive draws along ``axis``: ``repeats`` of them (the first R*m)."""
    v = v[(slice(None),) * axis + (slice(0, repeats * m),)]
    return v.reshape(v.shape[:axis] + (repeats, m) + v.shape[axis + 1 :]).mean(axis + 1)


def _seed(tree: PyTree, s: int | None) -> PyTree:
    """Seed ``s``'s slice of every leaf (``s=None``: the tree itself, no seed axis)."""
    return tree if s is None else jax.tree.map(lambda v: v[s], tree)
