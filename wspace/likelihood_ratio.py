"""Forward-only gradients: unified likelihood ratios (ULR) and an evolution-strategies baseline.

ULR (Jiang, Zhang, Xu, Yu, Peng, "One Forward is Enough for Neural Network
Training via Likelihood Ratio Method", ICLR 2024, arXiv 2305.08960) adds noise
to the output of every layer, ``x_{l+1} = phi(x_l; theta_l) + z_l``, and uses

    grad_theta E[L] = E[ L * J_theta(phi)^T psi(z_l) ],   psi(z) = -grad_z log f(z).

``L * psi(z_l)`` is a likelihood-ratio estimate of the cotangent of layer l's
output; the layer's own local VJP (for a Dense layer ``x_l^T c``, for a
convolution the correlation of input patches with the cotangent maps) turns
it into a weight gradient. There is no backward pass through the network.
With Gaussian noise ``z = sigma * eps`` a Dense layer gets
``g_W = 1/(N sigma) sum_n L_n x_n eps_n^T`` (averaged over examples).

The noise goes into every ``flax.linen.Dense`` and ``flax.linen.Conv`` of the
model that ``loss_fn`` applies, through `flax.linen.intercept_methods`: the
user does not change the model. The N copies of each example run in one wide
forward pass (`jax.vmap` over copies, which XLA fuses into one batch of N*B).

`ulr` and `es` build estimators with the shape of `jax.value_and_grad`::

    est = ws.likelihood_ratio.ulr(num_copies=16, sigma=0.1, baseline="mean")
    loss_fn = ws.training.classification_loss(model.apply, per_example=True)
    (loss, aux), grads = est(loss_fn)(params, model_state, batch, key)
    step = ws.training.make_train_step(loss_fn, tx, estimator=est)
    est.forward_evaluations  # 16 per example (17 with baseline="clean")

Differences from ``jax.value_and_grad(loss_fn, has_aux)``: ``loss_fn`` may
return per-example losses of shape ``(B,)`` (preferred: each example's loss
then weights only its own noise) as well as a scalar; the value returned is
the mean loss over copies and examples (the clean loss with
``baseline="clean"``); ``aux`` is the mean over copies of each copy's aux
(integer leaves: the first copy's), or the clean pass's aux with
``baseline="clean"``; ``has_aux=False`` returns ``(loss, grads)`` as
``jax.value_and_grad`` does. The PRNG key (raw ``uint32[2]`` or typed) is
required. Noise comes from `jax.random` (threefry, chosen by measurement:
see `_draw`), ``fold_in`` per perturbed site and copy, independent of the
key ``loss_fn`` receives (for dropout).

Limitations: parameters outside Dense/Conv layers (BatchNorm scale and bias,
embeddings) get zero gradient; layers inside flax lifted transforms
(``nn.scan``, ``nn.remat``) are not supported; under BatchNorm in train mode
the examples of one copy interact, so per-example weighting is only
approximately unbiased.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

NOISES = ("gaussian", "laplace", "logistic")
BASELINES = ("none", "clean", "mean")
LAYER_TYPES = (nn.Dense, nn.Conv)
_QMC_MAX_DIMS = 4096  # columns of the Sobol table; noise coordinates reuse columns cyclically
_NOISE_STREAM = 0x554C52  # fold_in word separating the noise keys from loss_fn's key


# ----------------------------------------------------------------------------- noise


def score(noise: str, e: jax.Array, sigma) -> jax.Array:
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
    _check_noise(noise)
    if noise == "gaussian":
        return e / sigma
    if noise == "laplace":
        return jnp.sign(e) / sigma
    return jnp.tanh(e / 2) / sigma


def _noise_key(key) -> jax.Array:
    """The typed key all noise derives from: ``fold_in(key, _NOISE_STREAM)``.

    A raw key (``uint32[2]`` from ``jax.random.PRNGKey``) is wrapped with the
    default implementation; a typed key keeps its own.
    """
    if key is None:
        raise ValueError("ULR/ES estimators need a PRNG key as fourth argument, got None")
    if not jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return jax.random.fold_in(key, _NOISE_STREAM)


def _draw(noise: str, key, shape) -> jax.Array:
    """Unit-scale iid noise of one family (float32) from `jax.random`.

    threefry2x32 (JAX's default) was chosen by measurement (benchmarks/
    likelihood_ratio.py ``--rng``; 2-core CPU, whole estimator, depth 4):
    run time within noise of the former counter hash and of ``rbg`` /
    ``unsafe_rbg`` (XLA's RngBitGenerator), compile ~3.3 CPU-s against
    0.6 (hash) and ~1.0-1.4 (rbg); but rbg keys are not reproducible
    across backends and run 8-15x slower unoptimised (the tests' level).
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
    from scipy.stats import qmc

    with warnings.catch_warnings():  # scipy warns when n is not a power of 2
        warnings.simplefilter("ignore", UserWarning)
        return qmc.Sobol(d=dims, scramble=True, seed=0).random(n).astype(np.float32)


def unit_noise(
    key,
    site,
    copy,
    shape: tuple[int, ...],
    *,
    noise: str = "gaussian",
    num_copies: int = 1,
    antithetic: bool = False,
    qmc: bool = False,
    dtype=jnp.float32,
) -> jax.Array:
    """Unit noise of one perturbed site (layer output or parameter leaf) for one copy.

    Plain: iid draws from ``fold_in(fold_in(key, site), copy)``. Antithetic:
    copies ``n`` and ``n + N/2`` share draws with opposite signs. QMC: a fixed
    scrambled Sobol table of N (or N/2) points, one column per noise
    coordinate (cyclically), shifted by a fresh uniform per coordinate
    (Cranley-Patterson rotation, from ``fold_in(key, site)``) and mapped
    through the inverse CDF: each copy is exactly iid noise, and the copies
    are stratified against one another.

    Args:
      key: a typed PRNG key (the estimator passes ``_noise_key(key)``).
      site, copy: integer ids of the site and of the copy in ``[0, num_copies)``
        (may be traced: the copy is, under `jax.vmap`).
      shape, dtype: of the result (drawn in float32).
      noise, num_copies, antithetic, qmc: as in `ulr`.

    Returns:
      An array of ``shape`` with unit-scale noise.
    """
    n_base = num_copies // 2 if antithetic else num_copies
    pair = copy % n_base
    k_site = jax.random.fold_in(key, site)
    if qmc:
        size = math.prod(shape)
        dims = min(size, _QMC_MAX_DIMS)
        table = jnp.asarray(_sobol_table(n_base, dims))
        shift = jax.random.uniform(k_site, (size,))  # shared by all copies
        u = jnp.mod(table[pair][jnp.arange(size) % dims] + shift, 1.0)
        e = _inverse_cdf(noise, jnp.clip(u, 1e-7, 1 - 1e-7).reshape(shape))
    else:
        e = _draw(noise, jax.random.fold_in(k_site, pair), shape)
    if antithetic:
        e = jnp.where(copy < n_base, e, -e)
    return e.astype(dtype)


def _after(value, x):
    """``value``, made data-dependent on ``x`` so XLA cannot compute with it early.

    ``x != x`` is false except for NaN, and XLA may not fold it away; the
    value is unchanged for finite inputs. Needed on XLA:CPU (an optimisation
    barrier does not survive its pipeline; without this all layers' noise is
    materialised at the start and memory grows with depth) and in
    ``recompute`` mode; see `_needs_after`.
    """
    probe = jnp.ravel(x)[0]
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.where(probe != probe, jnp.nan, value)
    return value + (probe != probe).astype(value.dtype)


def _needs_after(recompute: bool) -> bool:
    """`_after` only where it is needed: the XLA:CPU pipeline, or ``recompute`` mode."""
    return recompute or jax.default_backend() == "cpu"


# ----------------------------------------------------------------------------- validation


def _check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def _check_sigma(sigma) -> None:
    values = sigma.values() if isinstance(sigma, Mapping) else [sigma]
    for s in values:
        if isinstance(s, jax.core.Tracer):
            continue
        ok = isinstance(s, int | float | np.number) or (hasattr(s, "ndim") and s.ndim == 0)
        if not ok or not (np.isfinite(float(s)) and float(s) > 0):
            raise ValueError(
                f"sigma must be a finite float > 0 (or a mapping of layer paths to such "
                f"floats), got {s!r}"
            )


def _validate(num_copies, sigma, noise, antithetic, baseline, qmc=False) -> None:
    is_int = isinstance(num_copies, int | np.integer) and not isinstance(num_copies, bool)
    if not is_int or num_copies < 1:
        raise ValueError(f"num_copies must be an integer >= 1, got {num_copies!r}")
    _check_sigma(sigma)
    _check_noise(noise)
    if antithetic and num_copies % 2:
        raise ValueError(f"antithetic pairs need an even num_copies, got {num_copies}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    groups = num_copies // 2 if antithetic else num_copies
    if baseline == "mean" and groups < 2:
        raise ValueError(
            f"baseline='mean' (leave-one-out) needs at least 2 independent "
            f"{'pairs' if antithetic else 'copies'}, got num_copies={num_copies}"
        )
    if baseline == "mean" and qmc:
        raise ValueError(
            "baseline='mean' with qmc=True is biased (QMC copies are dependent); "
            "use baseline='clean' or 'none'"
        )


# ----------------------------------------------------------------------------- helpers


def _is_site(context, layer_types) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, layer_types)


def _layer_name(module) -> str:
    return "/".join(str(p) for p in module.path)


def _split_loss(out, has_aux):
    return out if has_aux else (out, None)


def _reduce_copies(tree):
    """Mean over the leading copy axis for float leaves; the first copy for the others."""
    return jax.tree.map(
        lambda a: jnp.mean(a, 0) if jnp.issubdtype(a.dtype, jnp.inexact) else a[0], tree
    )


def _sigma_of(sigma, name: str):
    return sigma[name] if isinstance(sigma, Mapping) else sigma


def forward_evaluations(*, num_copies: int, baseline: str = "none", recompute: bool = False) -> int:
    """Forward evaluations per example of one ULR/ES gradient: ``N (x2 recompute) (+1 clean)``.

    A clean baseline runs one extra noise-free pass (N + 1); ``recompute``
    (ULR only) runs the N noisy passes twice.
    """
    return num_copies * (2 if recompute else 1) + (baseline == "clean")


def perturbed_layers(
    loss_fn: Callable,
    params: PyTree,
    model_state: PyTree,
    batch: dict,
    key=None,
    *,
    has_aux: bool = True,
    layer_types: tuple = LAYER_TYPES,
) -> list[tuple[str, tuple[int, ...]]]:
    """The layers ULR perturbs, as ``(path, output shape)`` in call order (traced abstractly).

    Args:
      loss_fn: the library's loss signature.
      params, model_state, batch, key: arguments of ``loss_fn``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      layer_types: the flax module classes that receive noise.

    Returns:
      A list with one entry per call of a perturbed layer (a shared layer
      called twice appears twice).
    """
    found = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_site(context, layer_types):
            found.append((_layer_name(context.module), tuple(out.shape)))
        return out

    def run(p, s, b, k):
        with nn.intercept_methods(intercept):
            return _split_loss(loss_fn(p, s, b, k), has_aux)[0]

    jax.eval_shape(run, params, model_state, batch, key)
    return found


# ----------------------------------------------------------------------------- ULR


@dataclasses.dataclass(frozen=True, eq=False)
class ULR:
    """A configured ULR estimator (build it with `ulr`; fields documented there)."""

    num_copies: int = 16
    sigma: float | Mapping[str, float] = 0.1
    noise: str = "gaussian"
    antithetic: bool = False
    baseline: str = "none"
    layerwise: bool = False
    qmc: bool = False
    recompute: bool = False
    layer_types: tuple = LAYER_TYPES

    def __post_init__(self):
        _validate(self.num_copies, self.sigma, self.noise, self.antithetic, self.baseline, self.qmc)

    @property
    def forward_evaluations(self) -> int:
        """Forward evaluations per example of one gradient (see `forward_evaluations`)."""
        return forward_evaluations(
            num_copies=self.num_copies, baseline=self.baseline, recompute=self.recompute
        )

    def __call__(self, loss_fn: Callable, has_aux: bool = True) -> Callable:
        """``fn(params, model_state, batch, key) -> ((loss, aux), grads)`` (see `ulr`)."""
        return functools.partial(_ulr_gradient, self, loss_fn, has_aux)


def ulr(
    *args,
    num_copies: int = 16,
    sigma: float | Mapping[str, float] = 0.1,
    noise: str = "gaussian",
    antithetic: bool = False,
    baseline: str = "none",
    layerwise: bool = False,
    qmc: bool = False,
    recompute: bool = False,
    layer_types: tuple = LAYER_TYPES,
) -> ULR:
    """A ULR gradient estimator: noise-injected forward passes alone, no backward pass.

    For every Dense/Conv output ``o_l`` the model computes ``o_l + sigma_l e_l``
    (N copies per example, one wide pass); the output cotangent is estimated
    as ``c_l = mean_n (L_n - b_n) psi(e_l) / sigma_l`` and the layer's local
    VJP maps it to parameter gradients:
    ``g_l = J_{theta_l}(o_l)^T c_l`` (``x_l^T c_l`` for a Dense layer).

    Args:
      num_copies: N, noisy copies of each example (forward evaluations per example).
      sigma: noise scale (Gaussian std, Laplace/logistic scale), finite and > 0,
        or a mapping from layer path (``"Dense_0"``, ``"Block_0/Conv_1"``,
        ``"head"``) to scale.
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      antithetic: copies ``n`` and ``n + N/2`` get ``+e`` and ``-e`` (N even).
      baseline: ``none``; ``clean`` (the loss of one extra noise-free pass,
        whose ``aux`` is then returned; N + 1 forward evaluations); ``mean``
        (leave-one-out mean over the other copies, or other pairs with
        ``antithetic``; unbiased, no extra pass). Antithetic pairs alone
        cancel the ``L * psi`` term only where both members see the same
        layer input (the first layer); deeper layers need a baseline too.
      layerwise: each copy perturbs one layer only (copies assigned round-robin
        over the perturbed layers; needs N (pairs) >= number of layers); the
        total cost stays N forward evaluations.
      qmc: randomised quasi-Monte Carlo noise (scrambled Sobol table from
        `scipy.stats.qmc`, a fresh random shift per coordinate each call).
      recompute: low-memory mode: a first pass computes the losses, a second
        noisy pass (same noise) forms each layer's gradient as soon as its
        output exists, so layer inputs are not kept for the whole pass
        (2N forward evaluations, activation memory independent of depth).
        BatchNorm in the second pass normalises each copy over its own
        examples, as in the first pass, so the gradient equals the one-pass
        gradient; other layers that mix the examples of a batch would see
        all N copies at once there and are not supported.
      layer_types: flax module classes that receive noise.

    Returns:
      A `ULR` estimator ``est`` with the shape of `jax.value_and_grad`:
      ``est(loss_fn, has_aux=True)(params, model_state, batch, key) ->
      ((loss, aux), grads)`` (``(loss, grads)`` with ``has_aux=False``);
      ``loss_fn(params, model_state, batch, key)`` returns a loss of shape
      ``(B,)`` (per example, preferred) or a scalar; ``grads`` matches
      ``params`` (zeros outside perturbed layers); see the module docstring
      for how ``loss`` and ``aux`` differ from `jax.value_and_grad`'s.
      ``est.forward_evaluations`` is the cost per example.

    Raises:
      ValueError: for an invalid option (before any work).

    Reference: Jiang, Zhang, Xu, Yu, Peng, ICLR 2024, arXiv 2305.08960.
    """
    options = dict(
        num_copies=num_copies,
        sigma=sigma,
        noise=noise,
        antithetic=antithetic,
        baseline=baseline,
        layerwise=layerwise,
        qmc=qmc,
        recompute=recompute,
        layer_types=tuple(layer_types),
    )
    if not args:
        return ULR(**options)
    if not callable(args[0]) or len(args) > 2:
        raise ValueError(f"ulr takes keyword options only, got positional {args!r}")
    warnings.warn(  # the form of the previous release: ulr(loss_fn, has_aux, **options)
        "ulr(loss_fn, ...) is deprecated; use ulr(...options)(loss_fn, has_aux)",
        DeprecationWarning,
        stacklevel=2,
    )
    return ULR(**options)(*args)


def _ulr_gradient(cfg: ULR, loss_fn, has_aux, params, model_state, batch, key):
    """The ULR estimate (see `ulr`)."""
    n_copies = cfg.num_copies
    key_noise, key_loss = _noise_key(key), key
    sites = perturbed_layers(
        loss_fn, params, model_state, batch, key_loss, has_aux=has_aux, layer_types=cfg.layer_types
    )
    _check_sites(sites, cfg)
    num_sites = len(sites)
    per_layer = _copies_per_site(cfg, num_sites)
    copies = jnp.arange(n_copies)
    delay = _needs_after(cfg.recompute)
    noise_opts = dict(noise=cfg.noise, num_copies=n_copies, antithetic=cfg.antithetic, qmc=cfg.qmc)

    def noisy(p, copy, collect):
        """One copy's noisy pass; ``collect`` records (layer output, unit noise)."""
        counter, records = [0], []

        def intercept(next_fun, args, kwargs, context):
            if not _is_site(context, cfg.layer_types):
                return next_fun(*args, **kwargs)
            i = counter[0]
            counter[0] += 1
            x = jax.lax.stop_gradient(args[0])  # local VJP only: no path through x
            site = _after(jnp.uint32(i), x) if delay else i
            out = next_fun(x, *args[1:], **kwargs)
            e = unit_noise(key_noise, site, copy, out.shape, dtype=out.dtype, **noise_opts)
            if cfg.layerwise:
                e = e * (_assigned_site(cfg, copy, num_sites) == i).astype(e.dtype)
            s = _sigma_of(cfg.sigma, _layer_name(context.module))
            if collect:
                records.append((out, e))
            return out + s * e

        with nn.intercept_methods(intercept):
            loss, aux = _split_loss(loss_fn(p, model_state, batch, key_loss), has_aux)
        return loss, aux, records

    # Pass 1 (the only one unless recompute): losses, and layer outputs for the VJP.
    def wide(p):
        loss, aux, recs = jax.vmap(lambda c: noisy(p, c, not cfg.recompute))(copies)
        return [o for o, _ in recs], (loss, aux, [e for _, e in recs])

    if cfg.recompute:
        _, (losses, aux, _) = wide(params)
    else:
        outs, vjp_fn, (losses, aux, noises) = jax.vjp(wide, params, has_aux=True)
    losses = _check_losses(losses, sites)
    clean_loss, clean_aux = None, None
    if cfg.baseline == "clean":
        clean_loss, clean_aux = _split_loss(loss_fn(params, model_state, batch, key_loss), has_aux)
    weights = _weights(losses, clean_loss, cfg)  # (N,) or (N, B): scale of psi per copy

    if cfg.recompute:
        # Pass 2 starts only once the weights exist (else XLA runs its forward early
        # and keeps every layer input waiting for them).
        batch_b = jax.tree.map(lambda a: _after(a, weights), batch)
        grads = _second_pass(
            cfg, loss_fn, params, model_state, batch_b, key_noise, key_loss, weights, per_layer
        )
    else:
        cots = []
        for i, (out, e) in enumerate(zip(outs, noises, strict=True)):
            w = weights.reshape(weights.shape + (1,) * (out.ndim - weights.ndim))
            s = _sigma_of(cfg.sigma, sites[i][0])
            cots.append(w * score(cfg.noise, e, s) / per_layer[i])
        (grads,) = vjp_fn(cots)

    loss = jnp.mean(losses) if clean_loss is None else jnp.mean(clean_loss)
    aux = _reduce_copies(aux) if clean_loss is None else clean_aux
    return ((loss, aux) if has_aux else loss), grads


def _per_copy_batchnorm(context, args, kwargs, n):
    """A BatchNorm call on the copy-major tiled batch, normalised per copy (vmapped apply)."""
    x = args[0]
    layer = context.module.clone(parent=None)
    variables = dict(context.module.variables)

    def one(xi):
        out, _ = layer.apply(variables, xi, *args[1:], **kwargs, mutable=["batch_stats"])
        return out

    return jax.vmap(one)(x.reshape((n, -1) + x.shape[1:])).reshape(x.shape)


def _second_pass(cfg, loss_fn, params, model_state, batch, key_noise, key_loss, weights, per_layer):
    """Recompute mode: one tiled noisy pass that forms each layer's gradient on the spot.

    The batch is tiled N times (copy-major, the order of the vmapped first
    pass, so the noise and layer inputs are identical; BatchNorm normalises
    each copy's block separately, as the vmapped pass does); at each
    perturbed layer the cotangent ``c = w psi(e) / M_l`` is known already
    and the layer's local VJP runs at once; an optimisation barrier makes
    the next layer wait for it, so each layer input dies before the next
    layer runs.
    """
    n = cfg.num_copies
    copies = jnp.arange(n)
    num_sites = len(per_layer)
    noise_opts = dict(noise=cfg.noise, num_copies=n, antithetic=cfg.antithetic, qmc=cfg.qmc)
    tiled = jax.tree.map(lambda a: jnp.concatenate([a] * n, 0), batch)
    counter, inside, acc = [0], [False], {}

    def intercept(next_fun, args, kwargs, context):
        if inside[0]:
            return next_fun(*args, **kwargs)
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            inside[0] = True
            out = _per_copy_batchnorm(context, args, kwargs, n)
            inside[0] = False
            return out
        if not _is_site(context, cfg.layer_types):
            return next_fun(*args, **kwargs)
        i = counter[0]
        counter[0] += 1
        x = args[0]
        site = _after(jnp.uint32(i), x)
        layer = context.module.clone(parent=None)
        inside[0] = True
        out, vjp = jax.vjp(  # the layer's forward and its local VJP (parameters only)
            lambda p: layer.apply({"params": p}, x, *args[1:], **kwargs),
            context.module.variables["params"],
        )
        inside[0] = False
        per_copy = (out.shape[0] // n,) + out.shape[1:]
        e = jax.vmap(
            lambda c: unit_noise(key_noise, site, c, per_copy, dtype=out.dtype, **noise_opts)
        )(copies)
        if cfg.layerwise:
            mask = (_assigned_site(cfg, copies, num_sites) == i).astype(e.dtype)
            e = e * mask.reshape((n,) + (1,) * (e.ndim - 1))
        sigma = _sigma_of(cfg.sigma, _layer_name(context.module))
        w = weights.reshape(weights.shape + (1,) * (e.ndim - weights.ndim))
        cot = (w * score(cfg.noise, e, sigma) / per_layer[i]).reshape(out.shape)
        (g,) = vjp(cot)
        g, noisy = jax.lax.optimization_barrier((g, out + sigma * e.reshape(out.shape)))
        path = tuple(context.module.path)
        acc[path] = g if path not in acc else jax.tree.map(jnp.add, acc[path], g)
        return noisy

    with nn.intercept_methods(intercept):
        loss_fn(params, model_state, tiled, key_loss)  # the loss itself is dead code
    grads = jax.tree.map(jnp.zeros_like, params)
    for path, g in acc.items():
        node = grads
        try:
            for name in path[:-1]:
                node = node[name]
            node[path[-1]] = jax.tree.map(jnp.add, node[path[-1]], g)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"recompute=True looks layers up in params by module path; {'/'.join(path)} "
                "is not there (loss_fn must apply the model to {'params': params})"
            ) from err
    return grads


def _check_sites(sites, cfg: ULR) -> None:
    if not sites:
        names = ", ".join(t.__name__ for t in cfg.layer_types)
        raise ValueError(
            f"loss_fn's model has no layer of type ({names}) to perturb; ULR injects noise "
            "at Dense/Conv outputs (pass layer_types= for other flax modules)"
        )
    if isinstance(cfg.sigma, Mapping):
        missing = sorted({name for name, _ in sites} - set(cfg.sigma))
        if missing:
            raise ValueError(
                f"sigma mapping {dict(cfg.sigma)} lacks the perturbed layers {missing}"
            )
    if cfg.layerwise:
        groups = cfg.num_copies // 2 if cfg.antithetic else cfg.num_copies
        if groups < len(sites):
            raise ValueError(
                f"layerwise needs at least one {'pair' if cfg.antithetic else 'copy'} per "
                f"perturbed layer: num_copies={cfg.num_copies} for {len(sites)} layers"
            )


def _assigned_site(cfg, copy, num_sites):
    groups = cfg.num_copies // 2 if cfg.antithetic else cfg.num_copies
    return (copy % groups) % num_sites


def _copies_per_site(cfg, num_sites) -> list[int]:
    if not cfg.layerwise:
        return [cfg.num_copies] * num_sites
    assigned = [_assigned_site(cfg, c, num_sites) for c in range(cfg.num_copies)]
    return [assigned.count(i) for i in range(num_sites)]


def _check_losses(losses, sites) -> jax.Array:
    """(N,) per-copy scalars or (N, B) per-example losses, B the layers' leading size."""
    batch_size = sites[0][1][0] if sites[0][1] else None
    if losses.ndim == 1 or (losses.ndim == 2 and losses.shape[1] == batch_size):
        return losses
    raise ValueError(
        f"loss_fn must return a scalar or per-example losses of shape ({batch_size},), "
        f"got shape {losses.shape[1:]}"
    )


def _weights(losses, clean_loss, cfg) -> jax.Array:
    """``(L_n - b_n) / B`` per copy (and example): the factor of psi(e) in each cotangent."""
    n = cfg.num_copies
    if cfg.baseline == "clean":
        b = jnp.broadcast_to(clean_loss, losses.shape[1:])
        centred = losses - b
    elif cfg.baseline == "mean":
        if cfg.antithetic:  # leave out the whole pair: the partner shares the noise
            half = n // 2
            pair_sum = losses[:half] + losses[half:]
            loo = (jnp.sum(pair_sum, 0) - pair_sum) / (2 * (half - 1))
            centred = losses - jnp.concatenate([loo, loo])
        else:
            loo = (jnp.sum(losses, 0) - losses) / (n - 1)
            centred = losses - loo
    else:
        centred = losses
    if losses.ndim == 2:  # per-example: the target is the batch mean
        centred = centred / losses.shape[1]
    return jax.lax.stop_gradient(centred)


def noisy_loss(
    loss_fn: Callable,
    *,
    sigma: float | Mapping[str, float] = 0.1,
    noise: str = "gaussian",
    layer_types: tuple = LAYER_TYPES,
) -> Callable:
    """``loss_fn`` with ULR's noise injected: ``o_l + sigma e_l`` at every Dense/Conv output.

    The control arm that separates ULR's estimator from its noise: trained by
    backprop (`jax.value_and_grad`), the model sees the noise ULR injects,
    drawn exactly as copy 0 of `ulr` draws it from the same key (the noisy
    pass of ``ulr(num_copies=1)``).

    Args:
      loss_fn: the library's loss signature.
      sigma: noise scale (finite, > 0), or a mapping from layer path to scale.
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      layer_types: flax module classes that receive noise.

    Returns:
      ``noisy(params, model_state, batch, key)`` with ``loss_fn``'s outputs; ``key``
      (required) draws the noise and is passed on to ``loss_fn``.
    """
    _validate(1, sigma, noise, False, "none")

    def noisy(params, model_state, batch, key):
        key_noise, counter = _noise_key(key), [0]

        def intercept(next_fun, args, kwargs, context):
            if not _is_site(context, layer_types):
                return next_fun(*args, **kwargs)
            i = counter[0]
            counter[0] += 1
            out = next_fun(*args, **kwargs)
            e = unit_noise(key_noise, i, 0, out.shape, noise=noise, dtype=out.dtype)
            return out + _sigma_of(sigma, _layer_name(context.module)) * e

        with nn.intercept_methods(intercept):
            return loss_fn(params, model_state, batch, key)

    return noisy


# ----------------------------------------------------------------------------- ES baseline


@dataclasses.dataclass(frozen=True, eq=False)
class ES:
    """A configured evolution-strategies estimator (build it with `es`)."""

    num_copies: int = 16
    sigma: float = 0.01
    antithetic: bool = True
    baseline: str = "none"

    def __post_init__(self):
        _validate(self.num_copies, self.sigma, "gaussian", self.antithetic, self.baseline)

    @property
    def forward_evaluations(self) -> int:
        """Forward evaluations per example of one gradient: N (+1 with a clean baseline)."""
        return forward_evaluations(num_copies=self.num_copies, baseline=self.baseline)

    def __call__(self, loss_fn: Callable, has_aux: bool = True) -> Callable:
        """``fn(params, model_state, batch, key) -> ((loss, aux), grads)`` (see `es`)."""
        return functools.partial(_es_gradient, self, loss_fn, has_aux)


def es(
    *args,
    num_copies: int = 16,
    sigma: float = 0.01,
    antithetic: bool = True,
    baseline: str = "none",
) -> ES:
    """Weight-perturbation (evolution strategies) gradient: the baseline ULR must beat.

    ``g = 1/(N sigma) sum_n (L(theta + sigma eps_n) - b) eps_n`` with
    ``eps_n ~ N(0, I)`` over all parameters (OpenAI-ES with antithetic pairs).

    Args:
      num_copies: N, perturbed parameter vectors (forward evaluations per example).
      sigma: perturbation scale, finite and > 0.
      antithetic: pairs ``theta +- sigma eps`` (N even).
      baseline: ``none``, ``clean`` (one extra unperturbed pass: N + 1
        forward evaluations) or ``mean`` (leave-one-out over copies, or over
        pairs with ``antithetic``).

    Returns:
      An `ES` estimator with the shape of `jax.value_and_grad`:
      ``est(loss_fn, has_aux=True)(params, model_state, batch, key) ->
      ((loss, aux), grads)``; per-example losses are averaged; ``loss`` is
      the mean over copies (the clean loss with ``baseline="clean"``).

    Raises:
      ValueError: for an invalid option (before any work).

    Reference: Salimans, Ho, Chen, Sidor, Sutskever, 2017, arXiv 1703.03864.
    """
    options = dict(num_copies=num_copies, sigma=sigma, antithetic=antithetic, baseline=baseline)
    if args:
        if not callable(args[0]):
            raise ValueError(f"es takes keyword options only, got positional {args!r}")
        warnings.warn(
            "es(loss_fn, ...) is deprecated; use es(...options)(loss_fn, has_aux)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ES(**options)(*args)
    return ES(**options)


def _es_gradient(cfg: ES, loss_fn, has_aux, params, model_state, batch, key):
    """The ES estimate (see `es`)."""
    key_noise, key_loss = _noise_key(key), key
    leaves, treedef = jax.tree.flatten(params)
    noise_opts = dict(num_copies=cfg.num_copies, antithetic=cfg.antithetic)

    def one(copy):
        eps = jax.tree.unflatten(
            treedef,
            [
                unit_noise(key_noise, i, copy, x.shape, dtype=x.dtype, **noise_opts)
                for i, x in enumerate(leaves)
            ],
        )
        p = jax.tree.map(lambda x, e: x + cfg.sigma * e, params, eps)
        loss, aux = _split_loss(loss_fn(p, model_state, batch, key_loss), has_aux)
        return jnp.mean(loss), aux, eps

    losses, aux, eps = jax.vmap(one)(jnp.arange(cfg.num_copies))  # the N models exist anyway
    clean_loss, clean_aux = None, None
    if cfg.baseline == "clean":
        clean_loss, clean_aux = _split_loss(loss_fn(params, model_state, batch, key_loss), has_aux)
        clean_loss = jnp.mean(clean_loss)
    weights = _weights(losses, clean_loss, cfg) / (cfg.num_copies * cfg.sigma)
    grads = jax.tree.map(lambda e: jnp.tensordot(weights, e, axes=1), eps)
    loss = jnp.mean(losses) if clean_loss is None else clean_loss
    aux = _reduce_copies(aux) if clean_loss is None else clean_aux
    return ((loss, aux) if has_aux else loss), grads


# ----------------------------------------------------------------------------- deprecated


def likelihood_ratio(**options) -> ULR:
    """Deprecated alias of `ulr` (kept for one release)."""
    warnings.warn(
        "likelihood_ratio(...) is deprecated; use ulr(...)", DeprecationWarning, stacklevel=2
    )
    return ulr(**options)


def evolution_strategies(**options) -> ES:
    """Deprecated alias of `es` (kept for one release)."""
    warnings.warn(
        "evolution_strategies(...) is deprecated; use es(...)", DeprecationWarning, stacklevel=2
    )
    return es(**options)
