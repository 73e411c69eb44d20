"""The noise of ULR and ES: unit draws per site and copy, their scores, and the PRNG path.

Every noise coordinate comes from `jax.random` threefry2x32:
``fold_in(fold_in(fold_in(key, _NOISE_STREAM), site), pair)``, then one
draw of the site's shape. The hash is computed by `_THREEFRY_UNROLLED`, the
same threefry2x32 bits as JAX's default implementation (tested bit for bit)
written out round by round: on XLA:CPU JAX lowers threefry as a rolled
``while`` loop (``use_rolled_loops=True`` in jax/_src/random/threefry2x32.py)
whose state arrays are written to memory in each of its 5 iterations, while
the unrolled hash fuses into one elementwise loop (about 4x faster bits, 2.7x
faster normals on CPU; benchmarks/likelihood_ratio.py ``--profile``). On
GPU/TPU JAX's own lowering is the unrolled one already.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl, threefry_prng_impl
from jax.typing import ArrayLike, DTypeLike

NOISES = ("gaussian", "laplace", "logistic")
_QMC_MAX_DIMS = 4096  # columns of the Sobol table; noise coordinates reuse columns cyclically
_NOISE_STREAM = 0x554C52  # fold_in word separating the noise keys from loss_fn's key


def check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def score(noise: str, e: jax.Array, sigma: ArrayLike) -> jax.Array:
    """``-d/dz log f(z)`` at ``z = sigma * e`` for unit noise ``e`` of scale ``sigma``.

    Gaussian ``N(0, sigma^2)``: ``z / sigma^2 = e / sigma``; Laplace with scale
    ``b = sigma``: ``sign(z) / b``; logistic with scale ``s = sigma``:
    ``tanh(z / 2s) / s``. All three are odd.

    Args:
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      e: unit noise (scale 1).
      sigma: the scale.

    Returns:
      The score, same shape as ``e``.
    """
    check_noise(noise)
    if noise == "gaussian":
        return e / sigma
    if noise == "laplace":
        return jnp.sign(e) / sigma
    return jnp.tanh(e / 2) / sigma


# ----------------------------------------------------------------------------- PRNG

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash, 20 rounds (Salmon et al., SC 2011), unrolled.

    Bit for bit JAX's ``threefry2x32_p`` (its unrolled lowering, used on
    GPU/TPU); on CPU it fuses where JAX's rolled loop does not.
    """
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _random_bits(key, bit_width: int, shape) -> jax.Array:
    """JAX's threefry ``random_bits`` (partitionable layout) through the unrolled hash.

    32-bit draws of fewer than 2^32 words under ``jax_threefry_partitionable``
    (JAX's default): hash the flat index ``(0, i)`` and xor the two words, as
    JAX does. Any other request goes to JAX's own implementation.
    """
    size = math.prod(shape)
    if bit_width != 32 or size >= 2**32 or not jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]  # jax's Config stub lists no flags
        return threefry_prng_impl.random_bits(key, bit_width, shape)
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape)
    b1, b2 = _threefry2x32(key[0], key[1], jnp.zeros_like(lo), lo)
    return b1 ^ b2


_THREEFRY_UNROLLED = define_prng_impl(
    key_shape=threefry_prng_impl.key_shape,
    seed=threefry_prng_impl.seed,
    split=threefry_prng_impl.split,
    random_bits=_random_bits,
    fold_in=threefry_prng_impl.fold_in,
    name="threefry2x32 (unrolled)",
    tag="fry_unrolled",
)


def _noise_key(key) -> jax.Array:
    """The typed key all noise derives from: ``fold_in(key, _NOISE_STREAM)``.

    A raw key (``uint32[2]`` from ``jax.random.PRNGKey``) is wrapped with the
    default implementation; a threefry key is moved to the unrolled hash
    (same bits), a key of another implementation keeps its own.
    """
    if key is None:
        raise ValueError("ULR/ES estimators need a PRNG key as fourth argument, got None")
    if not jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):  # type: ignore[arg-type]  # None is allowed (False)
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    key = jax.random.fold_in(key, _NOISE_STREAM)
    if jax.random.key_impl(key) == "threefry2x32":
        key = jax.random.wrap_key_data(jax.random.key_data(key), impl=_THREEFRY_UNROLLED)
    return key


# ----------------------------------------------------------------------------- draws


def _draw(noise: str, key, shape) -> jax.Array:
    """Unit-scale iid noise of one family (float32) from `jax.random`.

    threefry2x32 (JAX's default) was chosen by measurement (benchmarks/
    likelihood_ratio.py ``--rng``; 2-core CPU, whole estimator): rbg /
    unsafe_rbg (XLA's RngBitGenerator) were no faster there, compile
    ~1.0-1.4 CPU-s against threefry's, and their keys are not reproducible
    across backends.
    """
    if noise == "gaussian":
        return jax.random.normal(key, shape)
    if noise == "laplace":
        return jax.random.laplace(key, shape)
    return jax.random.logistic(key, shape)


def _inverse_cdf(noise: str, u: jax.Array) -> jax.Array:
    if noise == "gaussian":
        return math.sqrt(2.0) * jax.lax.erf_inv(2 * u - 1)
    if noise == "laplace":
        c = u - 0.5
        return -jnp.sign(c) * jnp.log1p(-2 * jnp.abs(c))
    return jnp.log(u) - jnp.log1p(-u)


@functools.lru_cache(maxsize=32)
def _sobol_table(n: int, dims: int) -> np.ndarray:
    """``n`` scrambled Sobol points in ``dims`` dimensions (scipy.stats.qmc, fixed seed)."""
    from scipy.stats import qmc as scipy_qmc  # lazy: importing scipy.stats costs ~0.6 s

    with warnings.catch_warnings():  # scipy warns when n is not a power of 2
        warnings.simplefilter("ignore", UserWarning)
        return scipy_qmc.Sobol(d=dims, scramble=True, seed=0).random(n).astype(np.float32)


def pair_noise(
    key: jax.Array,
    site: int | jax.Array,
    pair: int | jax.Array,
    shape: tuple[int, ...],
    *,
    noise: str = "gaussian",
    num_pairs: int = 1,
    qmc: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
    """Unit noise of one perturbed site for one independent draw (a copy, or an antithetic pair).

    Plain: iid draws from ``fold_in(fold_in(key, site), pair)``. QMC: a fixed
    scrambled Sobol table of ``num_pairs`` points, one column per noise
    coordinate (cyclically), shifted by a fresh uniform per coordinate
    (Cranley-Patterson rotation, from ``fold_in(key, site)``) and mapped
    through the inverse CDF: each draw is exactly iid noise, and the draws
    are stratified against one another.

    Args:
      key: a typed PRNG key (the estimators pass ``_noise_key(key)``).
      site, pair: integer ids of the site and of the draw in ``[0, num_pairs)``
        (may be traced: the pair is, under `jax.vmap`).
      shape, dtype: of the result (drawn in float32).
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      num_pairs: independent draws per site (N, or N/2 with antithetic pairs).
      qmc: randomised quasi-Monte Carlo draws.

    Returns:
      An array of ``shape`` with unit-scale noise.
    """
    k_site = jax.random.fold_in(key, site)
    if qmc:
        size = math.prod(shape)
        dims = min(size, _QMC_MAX_DIMS)
        table = jnp.asarray(_sobol_table(num_pairs, dims))
        shift = jax.random.uniform(k_site, (size,))  # shared by all draws
        u = jnp.mod(table[pair][jnp.arange(size) % dims] + shift, 1.0)
        e = _inverse_cdf(noise, jnp.clip(u, 1e-7, 1 - 1e-7).reshape(shape))
    else:
        e = _draw(noise, jax.random.fold_in(k_site, pair), shape)
    return e.astype(dtype)


def num_pairs(num_copies: int, antithetic: bool) -> int:
    """Independent draws per site: ``N``, or ``N / 2`` when copies come in antithetic pairs."""
    return num_copies // 2 if antithetic else num_copies


def unit_noise(
    key: jax.Array,
    site: int | jax.Array,
    copy: int | jax.Array,
    shape: tuple[int, ...],
    *,
    noise: str = "gaussian",
    num_copies: int = 1,
    antithetic: bool = False,
    qmc: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
    """Unit noise of one perturbed site (layer output or parameter leaf) for one copy.

    Copy ``n`` gets the draw of pair ``n mod P`` (`pair_noise`, ``P`` =
    `num_pairs`); with ``antithetic`` copies ``n`` and ``n + N/2`` share it
    with opposite signs.

    Args:
      key: a typed PRNG key (the estimator passes ``_noise_key(key)``).
      site, copy: integer ids of the site and of the copy in ``[0, num_copies)``
        (may be traced: the copy is, under `jax.vmap`).
      shape, dtype: of the result (drawn in float32).
      noise, num_copies, antithetic, qmc: as in `ulr`.

    Returns:
      An array of ``shape`` with unit-scale noise.
    """
    n_pairs = num_pairs(num_copies, antithetic)
    e = pair_noise(
        key, site, copy % n_pairs, shape, noise=noise, num_pairs=n_pairs, qmc=qmc, dtype=dtype
    )
    return jnp.where(copy < n_pairs, e, -e) if antithetic else e
