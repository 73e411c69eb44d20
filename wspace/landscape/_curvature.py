"""Curvature: Hessian-vector products, top eigenvalues (Lanczos, power), Hutchinson trace."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from wspace.landscape._util import (
    _HIGHEST,
    EIGEN_METHODS,
    PyTree,
    _ById,
    _check_int,
    _check_mask,
    _check_same_tree,
)


def hvp(f: Callable, params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` with ``H = ∇²f(params)``, forward-over-reverse.

    ``H v = d/dε ∇f(params + ε v)|_{ε=0}``, computed as ``jax.jvp(jax.grad(f), (params,),
    (v,))``: one gradient's cost times a small constant, never forming ``H``
    (Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Traced at matmul
    precision ``"highest"``: a ground truth must not change with a backend's TF32 default.

    Args:
      f: ``f(params) -> scalar``, twice differentiable.
      params: the point (a pytree).
      v: the direction, a pytree of the same structure and shapes.

    Returns:
      ``H v``, a pytree shaped like ``params``. Not compiled here: for repeated use,
      ``jax.jit(lambda p, v: hvp(f, p, v))``.
    """
    _check_same_tree(params, v, "params", "v")
    with jax.default_matmul_precision("highest"):
        return jax.jvp(jax.grad(f), (params,), (v,))[1]


def top_hessian_eigenvalues(
    f: Callable,
    params: PyTree,
    *,
    k: int = 1,
    num_iters: int = 20,
    key: jax.Array,
    method: str = "lanczos",
    return_vectors: bool = False,
) -> jax.Array | tuple[jax.Array, list[PyTree]]:
    """The ``k`` largest (algebraic) eigenvalues of ``H = ∇²f(params)``, matrix-free.

    ``lanczos``: ``m = min(num_iters, dim)`` Lanczos steps from a random start on the
    flattened parameters with full reorthogonalisation (each new vector is
    Gram-Schmidt-ed twice against all previous ones), then the top ``k`` Ritz values of
    the ``m x m`` tridiagonal matrix (Lanczos 1950; as used for neural-network
    Hessians by Ghorbani et al. 2019, arXiv 1901.10159). The Ritz values interlace the
    spectrum, so with ``m < dim`` the ``i``-th estimate is a lower bound on ``λ_i``
    (the extremes converge first); with ``m = dim`` the result is exact up to
    rounding. After a breakdown (an invariant subspace found) it restarts with a
    vector orthogonal to the basis. ``power``: power iteration, ``num_iters``
    Hessian-vector products per eigenvalue; if the dominant eigenvalue ``λ`` is
    negative it reruns on ``H - λI`` so the answer is the algebraic maximum; for
    ``k > 1`` each further eigenpair iterates in the orthogonal complement of the ones
    found (deflation by projection). Power iteration converges at rate ``|λ₂/λ₁|`` per
    step: give it more iterations than Lanczos.

    Args:
      f: ``f(params) -> scalar`` (e.g. `classification_objective`).
      params: the point.
      k: how many eigenvalues, ``1 <= k <= dim``.
      num_iters: Lanczos steps (``>= k``), or power steps per eigenvalue.
      key: PRNG key for the random start vectors.
      method: ``"lanczos"`` or ``"power"``.
      return_vectors: also return the eigenvectors.

    Returns:
      ``(k,)`` array of eigenvalues in descending order; with ``return_vectors``,
      ``(eigenvalues, vectors)`` where ``vectors`` is a list of ``k`` unit-norm pytrees
      shaped like ``params``.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method={method!r}; use one of {EIGEN_METHODS}")
    _check_int(k, "k", 1)
    _check_int(num_iters, "num_iters", 1)
    if num_iters < k:
        raise ValueError(f"num_iters={num_iters} < k={k}; need at least k iterations")
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({dim})")
    # Random starts are drawn outside the compiled loop (keeps the program small).
    starts = jax.random.normal(key, (1 if method == "lanczos" else k, dim), flat.dtype)
    if method == "lanczos":
        evals, vecs = _lanczos_top(_ById(f), params, starts[0], k=k, m=min(num_iters, dim))
    else:
        evals, vecs = _power_top(_ById(f), params, starts, num_iters=num_iters)
    if return_vectors:
        return evals, [unravel(v) for v in vecs]
    return evals


def hessian_trace(
    f: Callable,
    params: PyTree,
    *,
    num_samples: int = 100,
    key: jax.Array,
    return_stderr: bool = False,
    mask: PyTree | None = None,
    per_weight: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Hutchinson's estimate of ``tr ∇²f(params)`` with Rademacher probes.

    ``tr H ≈ 1/S Σ_s z_sᵀ H z_s`` with ``z_s`` i.i.d. uniform on ``{-1, +1}^dim``
    (unbiased; its variance is ``2 Σ_{i≠j} H_ij²``, so it is exact for diagonal ``H``)
    (Hutchinson 1989; Avron & Toledo 2011; PyHessian, Yao et al. 2020, arXiv 1912.07145).
    With a ``mask`` the probes are ``m ⊙ z`` and the estimate is ``Σ_{i: m_i} H_ii``,
    the trace over the surviving weights of a pruned network; ``per_weight`` divides
    by their number ``n = Σ m_i`` (the mean Hessian diagonal, comparable across
    sparsities: a sum over 26× fewer weights is not 26× flatter).

    Args:
      f: ``f(params) -> scalar``.
      params: the point.
      num_samples: number of probes ``S`` (``>= 1``; ``>= 2`` for a standard error).
      key: PRNG key for the probes.
      return_stderr: also return the standard error ``std(z_sᵀ H z_s) / sqrt(S)``.
      mask: optional boolean pytree shaped like ``params``; ``None``: all coordinates.
      per_weight: return ``trace / n`` (and its standard error ``/ n``).

    Returns:
      the estimate (a scalar array), or ``(estimate, stderr)``.
    """
    _check_int(num_samples, "num_samples", 2 if return_stderr else 1)
    keep = ravel_pytree(_check_mask(mask, params))[0]
    samples = _hutchinson_samples(_ById(f), params, key, keep, num_samples=num_samples)
    if per_weight:
        samples = samples / jnp.maximum(jnp.sum(keep), 1)
    mean = jnp.mean(samples)
    if return_stderr:
        return mean, jnp.std(samples, ddof=1) / np.sqrt(num_samples)
    return mean


@functools.partial(jax.jit, static_argnames=("f", "k", "m"))
def _lanczos_top(f, params, start, *, k: int, m: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)
    alphas, betas, basis = _lanczos(lambda v: matvec(flat, v), start, m)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    evals, evecs = jnp.linalg.eigh(tri)
    evals, evecs = evals[::-1][:k], evecs[:, ::-1][:, :k]
    return evals, jnp.matmul(basis.T, evecs, precision=_HIGHEST).T


@functools.partial(jax.jit, static_argnames=("f", "num_iters"))
def _power_top(f, params, starts, *, num_iters: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)
    return _power(lambda v: matvec(flat, v), starts, num_iters)


@functools.partial(jax.jit, static_argnames=("f", "num_samples"))
def _hutchinson_samples(f, params, key, keep, *, num_samples: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)

    def one(k):
        z = jnp.where(keep, jax.random.rademacher(k, flat.shape, flat.dtype), 0)
        return jnp.vdot(z, matvec(flat, z), precision=_HIGHEST)

    return jax.lax.map(one, jax.random.split(key, num_samples))


def _flat_hvp(f: Callable, unravel: Callable) -> Callable:
    """``matvec(flat_params, flat_v) -> flat(H v)`` on the raveled parameters."""

    def matvec(flat, v):
        p, t = unravel(flat), unravel(v.astype(flat.dtype))
        with jax.default_matmul_precision("highest"):
            return ravel_pytree(jax.jvp(jax.grad(f), (p,), (t,))[1])[0]

    return matvec


def _orthogonalise(w, basis):
    """Removes the span of ``basis``'s rows from ``w`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
    return w


def _lanczos(matvec: Callable, v0, m: int):
    """``m`` Lanczos steps from ``v0`` with full reorthogonalisation: diagonals, off-diagonals,
    basis."""
    dim, dtype = v0.size, v0.dtype
    tiny = jnp.finfo(dtype).tiny
    tol = 100 * jnp.finfo(dtype).eps
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def body(j, carry):
        basis, alphas, betas = carry
        v = basis[j]
        w = matvec(v)
        scale = jnp.linalg.norm(w)
        alpha = jnp.vdot(v, w, precision=_HIGHEST)
        w = _orthogonalise(w, basis)  # rows > j are still zero
        beta = jnp.linalg.norm(w)
        broke = beta <= tol * scale + tiny
        # Restart after a breakdown with the unit vector of the coordinate least covered by
        # the basis (its squared column norms sum to j + 1 < dim, so one is below 1).
        e = jax.nn.one_hot(jnp.argmin(jnp.sum(basis * basis, axis=0)), dim, dtype=dtype)
        r = _orthogonalise(e, basis)
        nxt = jnp.where(
            broke, r / jnp.maximum(jnp.linalg.norm(r), tiny), w / jnp.maximum(beta, tiny)
        )
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(broke, 0.0, beta))

    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype))
    basis, alphas, betas = jax.lax.fori_loop(0, m, body, init)
    return alphas, betas, basis[:m]


def _power(matvec: Callable, starts, num_iters: int):
    """Top-``k`` algebraic eigenpairs by power iteration with deflation by projection.

    Eigenpair ``i`` iterates on ``P H P`` with ``P`` the projector onto the orthogonal
    complement of the pairs found so far (rows of ``found`` not yet set are zero, so
    they project nothing). If its dominant eigenvalue ``λ`` is negative, a second
    phase iterates on ``P (H - λI) P``, whose dominant eigenvalue is ``λ_max - λ``.
    """
    (k, dim), dtype = starts.shape, starts.dtype
    tiny = jnp.finfo(dtype).tiny

    def pair(i, carry):
        found, evals = carry
        op = lambda v: _orthogonalise(matvec(_orthogonalise(v, found)), found)
        v0 = _orthogonalise(starts[i], found)
        v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), tiny)

        def phase(state):  # num_iters steps on op - shift·I, then the Rayleigh quotient of op
            stage, _, _, shift = state

            def step(_, v):
                w = op(v) - shift * v
                return w / jnp.maximum(jnp.linalg.norm(w), tiny)

            v = jax.lax.fori_loop(0, num_iters, step, v0)
            lam = jnp.vdot(v, op(v), precision=_HIGHEST)
            negative = (stage == 0) & (lam < 0)
            return jnp.where(negative, 1, 2), v, lam, jnp.where(negative, lam, shift)

        zero = jnp.zeros((), dtype)
        init = (jnp.zeros((), jnp.int32), v0, zero, zero)
        _, v, lam, _ = jax.lax.while_loop(lambda s: s[0] < 2, phase, init)
        return found.at[i].set(v), evals.at[i].set(lam)

    init = (jnp.zeros((k, dim), dtype), jnp.zeros(k, dtype))
    found, evals = jax.lax.fori_loop(0, k, pair, init)
    return evals, found
