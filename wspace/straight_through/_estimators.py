"""Stochastic binary units and the straight-through (ST) estimator family.

``x = sign(a - z)`` with noise ``z`` of CDF ``F`` (`NOISES`), and the backward
passes of `ESTIMATORS` as `jax.custom_vjp` functions: `straight_through`,
`stochastic_sign`, `bernoulli_weights`, `sign_ste`; the noise's `noise_cdf` and
`noise_pdf`. See `wspace.straight_through` for the maths.

Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880; Hubara et al. 2016, arXiv 1602.02830.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

NOISES = ("logistic", "uniform", "gaussian")
ESTIMATORS = ("st", "identity", "hardtanh", "tanh")


def check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    """Raises ValueError unless ``value`` is one of ``allowed`` (``what`` names the argument)."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(allowed)}")


# --------------------------------------------------------------------------- noise


def noise_cdf(a: jax.Array, noise: str = "logistic") -> jax.Array:
    """``F(a) = P(z < a)``: the probability that ``sign(a - z) = +1``.

    logistic: ``sigmoid(a)``; uniform on [-1, 1]: ``clip((a + 1)/2, 0, 1)``;
    gaussian (standard normal): ``Phi(a)``.
    """
    check_choice(noise, NOISES, "noise")
    if noise == "logistic":
        return jax.nn.sigmoid(a)
    if noise == "uniform":
        return jnp.clip((a + 1.0) / 2.0, 0.0, 1.0)
    return jax.scipy.stats.norm.cdf(a)


def noise_pdf(a: jax.Array, noise: str = "logistic") -> jax.Array:
    """``F'(a)``, the noise density (see `noise_cdf`)."""
    check_choice(noise, NOISES, "noise")
    if noise == "logistic":
        s = jax.nn.sigmoid(a)
        return s * (1.0 - s)
    if noise == "uniform":
        return jnp.where(jnp.abs(a) <= 1.0, 0.5, 0.0).astype(jnp.result_type(a))
    return jax.scipy.stats.norm.pdf(a)


def log_prob(s: jax.Array, a: jax.Array, noise: str) -> jax.Array:
    """``log P(x = s | a) = log F(s a)`` (all three noises are symmetric)."""
    if noise == "logistic":
        return jax.nn.log_sigmoid(s * a)
    if noise == "gaussian":
        return jax.scipy.stats.norm.logcdf(s * a)
    # uniform: impossible states get a tiny probability with a zero gradient (no 0/0)
    return jnp.log(jnp.maximum(noise_cdf(s * a, noise), 1e-30))


def _proxy_grad(a: jax.Array, noise: str, estimator: str) -> jax.Array:
    if estimator == "st":
        return 2.0 * noise_pdf(a, noise)
    if estimator == "identity":
        return jnp.ones_like(a)
    if estimator == "hardtanh":
        return (jnp.abs(a) <= 1.0).astype(a.dtype)
    return 1.0 - jnp.tanh(a) ** 2  # tanh


# ------------------------------------------------------------------- custom vjps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _straight_through(s, a, noise, estimator):
    return s


def _straight_through_fwd(s, a, noise, estimator):
    return s, (s, a)


def _straight_through_bwd(noise, estimator, res, g):
    s, a = res
    return jnp.zeros_like(s), g * _proxy_grad(a, noise, estimator)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def straight_through(
    s: jax.Array, a: jax.Array, *, noise: str = "logistic", estimator: str = "st"
) -> jax.Array:
    """Returns the given states ``s`` with an ST backward pass to ``a``.

    Forward: ``s``; backward: ``da = g * h'(a)`` with ``h' = 2F'`` (``st``),
    ``1`` (``identity``), ``1{|a| <= 1}`` (``hardtanh``) or ``1 - tanh(a)^2``
    (``tanh``). `stochastic_sign` is this with ``s`` sampled.

    Args:
      s: states (any values, usually +-1), same shape as ``a``.
      a: pre-activations (or latent weights).
      noise: one of `NOISES` (used by ``st`` only).
      estimator: one of `ESTIMATORS`.

    Returns:
      ``s`` (same dtype as ``a``).

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880, Sec. 3.
    """
    check_choice(noise, NOISES, "noise")
    check_choice(estimator, ESTIMATORS, "estimator")
    a = jnp.asarray(a)
    s = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(s, a.dtype), a.shape))
    return _straight_through(s, a, noise, estimator)


def stochastic_sign(
    key: jax.Array, a: jax.Array, *, noise: str = "logistic", estimator: str = "st"
) -> jax.Array:
    """Samples ``x = sign(a - z)``, ``z ~ F``, with a straight-through backward pass.

    ``P(x = +1) = F(a)``; the principled ``st`` backward multiplies by
    ``2F'(a) = dE[x]/da`` (exact in expectation when the loss is affine in x).

    Args:
      key: PRNG key.
      a: pre-activations.
      noise: ``logistic`` (default), ``uniform`` (on [-1, 1]) or ``gaussian``.
      estimator: ``st``, ``identity``, ``hardtanh`` or ``tanh`` (see `straight_through`).

    Returns:
      +-1 array of ``a``'s shape and dtype.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """
    check_choice(noise, NOISES, "noise")
    check_choice(estimator, ESTIMATORS, "estimator")
    a = jnp.asarray(a)
    u = jax.random.uniform(key, a.shape, dtype=a.dtype)
    s = jnp.where(u < noise_cdf(jax.lax.stop_gradient(a), noise), 1.0, -1.0).astype(a.dtype)
    return _straight_through(s, a, noise, estimator)


def bernoulli_weights(
    key: jax.Array, latent: jax.Array, *, noise: str = "logistic", estimator: str = "identity"
) -> jax.Array:
    """Samples binary weights ``w = +-1`` with ``P(w = +1) = F(latent)``, with an ST backward.

    ``identity`` (default): ``d/d latent = dL/dw``, the ST estimate of the gradient
    with respect to the mean ``mu = 2F(latent) - 1``; a plain step on the latent
    with it is mirror descent on ``mu`` (see `mirror_descent`). ``st``:
    ``2F'(latent) dL/dw``, the ST estimate of the gradient with respect to the
    latent itself (plain SGD on latent weights).

    Args:
      key: PRNG key.
      latent: latent weights ``eta``.
      noise: one of `NOISES`.
      estimator: one of `ESTIMATORS`.

    Returns:
      +-1 array of ``latent``'s shape.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880, Sec. 4 (latent weights).
    """
    return stochastic_sign(key, latent, noise=noise, estimator=estimator)


def sign_ste(a: jax.Array) -> jax.Array:
    """Deterministic ``sign(a)`` (``+1`` at 0) with the classic clipped STE, ``da = g 1{|a| <= 1}``.

    Reference: Hubara et al. 2016, arXiv 1602.02830 (BinaryNet); the
    comparison point of Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """
    a = jnp.asarray(a)
    s = jnp.where(jax.lax.stop_gradient(a) >= 0, 1.0, -1.0).astype(a.dtype)
    return _straight_through(s, a, "uniform", "hardtanh")
