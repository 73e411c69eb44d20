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

Estimators have the library's shape (that of `jax.value_and_grad`)::

    est = ws.likelihood_ratio.likelihood_ratio(num_copies=16, sigma=0.1, antithetic=True)
    loss_fn = ws.training.classification_loss(model.apply, per_example=True)
    (loss, aux), grads = est(loss_fn)(params, model_state, batch, key)
    step = ws.training.make_train_step(loss_fn, tx, estimator=est)

``loss_fn`` should return per-example losses (shape ``(B,)``; build it with
``classification_loss(apply_fn, per_example=True)``): each example's loss then
weights only its own noise. A scalar (batch-mean) loss also works: each copy's
batch loss weights all noise of that copy (unbiased, higher variance). The
reported loss is the mean over copies and examples.

Limitations: parameters outside Dense/Conv layers (BatchNorm scale and bias,
embeddings) get zero gradient; layers inside flax lifted transforms
(``nn.scan``, ``nn.remat``) are not supported; under BatchNorm in train mode
the examples of one copy interact, so per-example weighting is only
approximately unbiased.
"""

from __future__ import annotations

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


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 words."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _seed(key) -> jax.Array:
    """One uint32 word from a PRNG key (raw ``uint32[2]`` or typed), for `_uniform`."""
    if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key).astype(jnp.uint32).ravel()
    h = jnp.uint32(0x2545F491)
    for i in range(words.shape[0]):
        h = _mix32(h ^ words[i] + jnp.uint32(0x9E3779B9 * (i + 1) % 2**32))
    return h


def _uniform(seed, stream, shape) -> jax.Array:
    """Counter-based uniforms in (0, 1): ``mix(mix(i + s) ^ s')`` with 23-bit resolution.

    A hash of (seed, stream, coordinate) instead of `jax.random`: threefry
    takes ~10 s to compile per call site on a busy CPU, this takes well under
    one; both are exactly reproducible. ``stream`` may be traced (copy index).
    """
    s = _mix32(seed ^ _mix32(jnp.asarray(stream).astype(jnp.uint32) + jnp.uint32(0x632BE5AB)))
    i = jnp.arange(math.prod(shape), dtype=jnp.uint32)
    h = _mix32(_mix32(i * jnp.uint32(0x9E3779B1) + s) ^ (s * jnp.uint32(0x27D4EB2F)))
    # 23 bits: the largest value, 1 - 2^-24, is a float32 below 1 (with 24 bits it rounds to 1).
    u = ((h >> 9).astype(jnp.float32) + 0.5) * (1.0 / 2**23)
    return u.reshape(shape)


def _stream(*words: int | jax.Array) -> jax.Array:
    """Combines small integers (layer, copy, leaf) into one stream id."""
    h = jnp.uint32(0x165667B1)
    for w in words:
        h = _mix32(h ^ jnp.asarray(w).astype(jnp.uint32)) + jnp.uint32(0x9E3779B9)
    return h


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


def _unit_noise(opts: dict, seed, site: int, copy, shape, dtype) -> jax.Array:
    """Unit noise of one layer (or parameter leaf) for copy ``copy`` (traced under vmap).

    Plain: iid draws (inverse CDF of counter-based uniforms). Antithetic:
    copies ``n`` and ``n + N/2`` share draws with opposite signs. QMC: a fixed
    scrambled Sobol table of N (or N/2) points, one column per noise
    coordinate (cyclically), shifted by a fresh uniform per coordinate
    (Cranley-Patterson rotation) and mapped through the inverse CDF: each copy
    is exactly iid noise, and the copies are stratified against one another.
    """
    n_base = opts["num_copies"] // 2 if opts["antithetic"] else opts["num_copies"]
    pair = copy % n_base
    if opts["qmc"]:
        size = math.prod(shape)
        dims = min(size, _QMC_MAX_DIMS)
        table = jnp.asarray(_sobol_table(n_base, dims))
        shift = _uniform(seed, _stream(site, -1), (size,))  # shared by all copies
        u = jnp.mod(table[pair][jnp.arange(size) % dims] + shift, 1.0)
        u = jnp.clip(u, 1e-7, 1 - 1e-7).reshape(shape)
    else:
        u = _uniform(seed, _stream(site, pair), shape)
    e = _inverse_cdf(opts["noise"], u).astype(dtype)
    if opts["antithetic"]:
        e = jnp.where(copy < n_base, e, -e)
    return e


# ----------------------------------------------------------------------------- validation


def _check_noise(noise: str) -> None:
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def _check_sigma(sigma) -> None:
    values = sigma.values() if isinstance(sigma, Mapping) else [sigma]
    for s in values:
        if isinstance(s, jax.core.Tracer):
            continue
        if not np.all(np.asarray(s) > 0):
            raise ValueError(
                f"sigma must be > 0 (a float or a mapping of layer paths), got {sigma!r}"
            )


def _validate(num_copies, sigma, noise, antithetic, baseline, qmc=False) -> None:
    if not isinstance(num_copies, int | np.integer) or num_copies < 1:
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


def ulr(
    loss_fn: Callable,
    has_aux: bool = True,
    *,
    num_copies: int = 16,
    sigma: float | Mapping[str, float] = 0.1,
    noise: str = "gaussian",
    antithetic: bool = False,
    baseline: str = "none",
    layerwise: bool = False,
    qmc: bool = False,
    recompute: bool = False,
    layer_types: tuple = LAYER_TYPES,
) -> Callable:
    """Likelihood-ratio gradient of ``loss_fn`` from noise-injected forward passes alone.

    For every Dense/Conv output ``o_l`` the model computes ``o_l + sigma_l e_l``
    (N copies per example, one wide pass); the output cotangent is estimated
    as ``c_l = mean_n (L_n - b_n) psi(e_l) / sigma_l`` and the layer's local
    VJP maps it to parameter gradients:
    ``g_l = J_{theta_l}(o_l)^T c_l`` (``x_l^T c_l`` for a Dense layer).

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, key) -> (loss, aux)`` (or
        ``loss`` when ``has_aux=False``), loss of shape ``(B,)`` (per example,
        preferred) or a scalar.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      num_copies: N, noisy copies of each example (forward evaluations per example).
      sigma: noise scale (Gaussian std, Laplace/logistic scale), or a mapping
        from layer path (``"Dense_0"``, ``"Block_0/Conv_1"``, ``"head"``) to scale.
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      antithetic: copies ``n`` and ``n + N/2`` get ``+e`` and ``-e`` (N even).
      baseline: ``none``; ``clean`` (the loss of one extra noise-free pass,
        whose ``aux`` is then returned); ``mean`` (leave-one-out mean over the
        other copies, or other pairs with ``antithetic``; unbiased). Antithetic
        pairs alone cancel the ``L * psi`` term only where both members see the
        same layer input (the first layer); deeper layers need a baseline too.
      layerwise: each copy perturbs one layer only (copies assigned round-robin
        over the perturbed layers; needs N (pairs) >= number of layers); the
        total cost stays N forward evaluations.
      qmc: randomised quasi-Monte Carlo noise (scrambled Sobol table from
        `scipy.stats.qmc`, a fresh random shift per coordinate each call).
      recompute: low-memory mode: a first pass computes the losses, a second
        noisy pass (same noise) forms each layer's gradient as soon as its
        output exists, so layer inputs are not kept for the whole pass
        (2x forward compute, activation memory independent of depth).
      layer_types: flax module classes that receive noise.

    Returns:
      ``fn(params, model_state, batch, key) -> ((loss, aux), grads)`` (or
      ``(loss, grads)`` when ``has_aux=False``); ``loss`` is the mean loss over
      copies and examples (the clean loss with ``baseline='clean'``), ``aux``
      the loss_fn's aux averaged over copies; ``grads`` matches ``params``
      (zeros outside perturbed layers).

    Reference: Jiang, Zhang, Xu, Yu, Peng, ICLR 2024, arXiv 2305.08960.
    """
    _validate(num_copies, sigma, noise, antithetic, baseline, qmc)
    opts = dict(
        num_copies=int(num_copies),
        sigma=sigma,
        noise=noise,
        antithetic=bool(antithetic),
        baseline=baseline,
        layerwise=bool(layerwise),
        qmc=bool(qmc),
    )
    layer_types = tuple(layer_types)

    def fn(params, model_state, batch, key):
        n_copies = opts["num_copies"]
        key_noise, key_loss = _seed(key), key  # noise from a hash of the key (see _uniform)
        sites = perturbed_layers(
            loss_fn,
            params,
            model_state,
            batch,
            key_loss,
            has_aux=has_aux,
            layer_types=layer_types,
        )
        _check_sites(sites, opts, layer_types)
        num_sites = len(sites)
        per_layer = _copies_per_site(opts, num_sites)
        copies = jnp.arange(n_copies)

        def noisy(p, b, k_noise, copy, collect):
            """One copy's noisy pass; collect 'outs' records (layer output, unit noise)."""
            counter, records = [0], []

            def intercept(next_fun, args, kwargs, context):
                if not _is_site(context, layer_types):
                    return next_fun(*args, **kwargs)
                i = counter[0]
                counter[0] += 1
                x = jax.lax.stop_gradient(args[0])  # local VJP only: no path through x
                k_i = _after(k_noise, x)
                out = next_fun(x, *args[1:], **kwargs)
                e = _unit_noise(opts, k_i, i, copy, out.shape, out.dtype)
                if opts["layerwise"]:
                    e = e * (_assigned_site(opts, copy, num_sites) == i).astype(e.dtype)
                s = _sigma_of(opts["sigma"], _layer_name(context.module))
                if collect == "outs":
                    records.append((out, e))
                return out + s * e

            with nn.intercept_methods(intercept):
                loss, aux = _split_loss(loss_fn(p, model_state, b, key_loss), has_aux)
            return loss, aux, records

        # Pass 1 (the only one unless recompute): losses, and layer outputs for the VJP.
        collect = "none" if recompute else "outs"

        def wide(p):
            loss, aux, recs = jax.vmap(lambda c: noisy(p, batch, key_noise, c, collect))(copies)
            outs = [o for o, _ in recs]
            return outs, (loss, aux, [e for _, e in recs])

        if recompute:
            _, (losses, aux, _) = wide(params)
            vjp_fn = None
        else:
            outs, vjp_fn, (losses, aux, noises) = jax.vjp(wide, params, has_aux=True)
        losses = _check_losses(losses, sites)
        clean_loss, clean_aux = None, None
        if opts["baseline"] == "clean":
            clean_loss, clean_aux = _split_loss(
                loss_fn(params, model_state, batch, key_loss), has_aux
            )
        weights = _weights(losses, clean_loss, opts)  # (N,) or (N, B): scale of psi per copy

        if recompute:
            # Pass 2 starts only once the weights exist (else XLA runs its forward early
            # and keeps every layer input waiting for them).
            weights_b = weights
            key_b = _after(key_noise, weights)
            batch_b = jax.tree.map(lambda a: _after(a, weights), batch)

            grads = _second_pass(
                loss_fn,
                opts,
                params,
                model_state,
                batch_b,
                key_b,
                key_loss,
                weights_b,
                per_layer,
                num_sites,
                layer_types,
            )
        else:
            cots = []
            for i, (out, e) in enumerate(zip(outs, noises, strict=True)):
                w = weights.reshape(weights.shape + (1,) * (out.ndim - weights.ndim))
                s = _sigma_of(opts["sigma"], sites[i][0])
                cots.append(w * score(opts["noise"], e, s) / per_layer[i])
            (grads,) = vjp_fn(cots)

        loss = jnp.mean(losses) if clean_loss is None else jnp.mean(clean_loss)
        aux = _reduce_copies(aux) if clean_loss is None else clean_aux
        return ((loss, aux) if has_aux else loss), grads

    return fn


def _after(seed, x):
    """``seed`` (or any array), made data-dependent on ``x`` so XLA cannot compute with it early.

    ``x != x`` is false except for NaN, and XLA may not fold it away; the
    seed is unchanged for finite inputs. (An optimisation barrier does not
    survive XLA:CPU's pipeline; without this, all layers' noise is
    materialised at the start and memory grows with depth.)
    """
    probe = jnp.ravel(x)[0]
    if jnp.issubdtype(seed.dtype, jnp.floating):
        return jnp.where(probe != probe, jnp.nan, seed)
    return seed + (probe != probe).astype(seed.dtype)


def _second_pass(
    loss_fn,
    opts,
    params,
    model_state,
    batch,
    key_noise,
    key_loss,
    weights,
    per_layer,
    num_sites,
    layer_types,
):
    """Recompute mode: one tiled noisy pass that forms each layer's gradient on the spot.

    The batch is tiled N times (copy-major, the order of the vmapped first
    pass, so the noise and layer inputs are identical); at each perturbed
    layer the cotangent ``c = w psi(e) / M_l`` is known already and the layer's
    local VJP runs at once; an optimisation barrier makes the next layer wait
    for it, so each layer input dies before the next layer runs.
    """
    n = opts["num_copies"]
    copies = jnp.arange(n)
    tiled = jax.tree.map(lambda a: jnp.concatenate([a] * n, 0), batch)
    counter, inside, acc = [0], [False], {}

    def intercept(next_fun, args, kwargs, context):
        if inside[0] or not _is_site(context, layer_types):
            return next_fun(*args, **kwargs)
        i = counter[0]
        counter[0] += 1
        x = args[0]
        key_i = _after(key_noise, x)
        out = next_fun(*args, **kwargs)
        per_copy = (out.shape[0] // n,) + out.shape[1:]
        e = jax.vmap(lambda c: _unit_noise(opts, key_i, i, c, per_copy, out.dtype))(copies)
        if opts["layerwise"]:
            mask = (_assigned_site(opts, copies, num_sites) == i).astype(e.dtype)
            e = e * mask.reshape((n,) + (1,) * (e.ndim - 1))
        sigma = _sigma_of(opts["sigma"], _layer_name(context.module))
        w = weights.reshape(weights.shape + (1,) * (e.ndim - weights.ndim))
        cot = (w * score(opts["noise"], e, sigma) / per_layer[i]).reshape(out.shape)
        layer = context.module.clone(parent=None)
        inside[0] = True
        _, vjp = jax.vjp(
            lambda p: layer.apply({"params": p}, x, *args[1:], **kwargs),
            context.module.variables["params"],
        )
        inside[0] = False
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


def likelihood_ratio(**options) -> Callable:
    """A ULR estimator factory: ``likelihood_ratio(num_copies=..., ...)(loss_fn, has_aux)``.

    Validates ``options`` (see `ulr`) at once and returns an estimator with
    the shape of `jax.value_and_grad`, to pass as ``estimator=`` to
    `wspace.training.make_train_step`.

    Reference: Jiang, Zhang, Xu, Yu, Peng, ICLR 2024, arXiv 2305.08960.
    """
    _validate(
        options.get("num_copies", 16),
        options.get("sigma", 0.1),
        options.get("noise", "gaussian"),
        options.get("antithetic", False),
        options.get("baseline", "none"),
        options.get("qmc", False),
    )
    return functools.partial(_ulr_estimator, options=options)


def _ulr_estimator(loss_fn, has_aux=True, *, options):
    return ulr(loss_fn, has_aux, **options)


def _check_sites(sites, opts, layer_types) -> None:
    if not sites:
        names = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(
            f"loss_fn's model has no layer of type ({names}) to perturb; ULR injects noise "
            "at Dense/Conv outputs (pass layer_types= for other flax modules)"
        )
    if isinstance(opts["sigma"], Mapping):
        missing = sorted({name for name, _ in sites} - set(opts["sigma"]))
        if missing:
            raise ValueError(
                f"sigma mapping {dict(opts['sigma'])} lacks the perturbed layers {missing}"
            )
    if opts["layerwise"]:
        groups = opts["num_copies"] // 2 if opts["antithetic"] else opts["num_copies"]
        if groups < len(sites):
            raise ValueError(
                f"layerwise needs at least one {'pair' if opts['antithetic'] else 'copy'} per "
                f"perturbed layer: num_copies={opts['num_copies']} for {len(sites)} layers"
            )


def _assigned_site(opts, copy, num_sites):
    groups = opts["num_copies"] // 2 if opts["antithetic"] else opts["num_copies"]
    return (copy % groups) % num_sites


def _copies_per_site(opts, num_sites) -> list[int]:
    if not opts["layerwise"]:
        return [opts["num_copies"]] * num_sites
    assigned = [_assigned_site(opts, c, num_sites) for c in range(opts["num_copies"])]
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


def _weights(losses, clean_loss, opts) -> jax.Array:
    """``(L_n - b_n) / B`` per copy (and example): the factor of psi(e) in each cotangent."""
    n = opts["num_copies"]
    if opts["baseline"] == "clean":
        b = jnp.broadcast_to(clean_loss, losses.shape[1:])
        centred = losses - b
    elif opts["baseline"] == "mean":
        if opts["antithetic"]:  # leave out the whole pair: the partner shares the noise
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


# ----------------------------------------------------------------------------- ES baseline


def es(
    loss_fn: Callable,
    has_aux: bool = True,
    *,
    num_copies: int = 16,
    sigma: float = 0.01,
    antithetic: bool = True,
    baseline: str = "none",
) -> Callable:
    """Weight-perturbation (evolution strategies) gradient: the baseline ULR must beat.

    ``g = 1/(N sigma) sum_n (L(theta + sigma eps_n) - b) eps_n`` with
    ``eps_n ~ N(0, I)`` over all parameters (OpenAI-ES with antithetic pairs).

    Args:
      loss_fn: the library's loss signature (per-example losses are averaged).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      num_copies: N, perturbed parameter vectors (forward evaluations per example).
      sigma: perturbation scale (> 0).
      antithetic: pairs ``theta +- sigma eps`` (N even).
      baseline: ``none``, ``clean`` (one extra unperturbed pass) or ``mean``
        (leave-one-out over copies, or over pairs with ``antithetic``).

    Returns:
      ``fn(params, model_state, batch, key) -> ((loss, aux), grads)``.

    Reference: Salimans, Ho, Chen, Sidor, Sutskever, 2017, arXiv 1703.03864.
    """
    _validate(num_copies, sigma, "gaussian", antithetic, baseline)
    opts = dict(
        num_copies=int(num_copies),
        noise="gaussian",
        antithetic=bool(antithetic),
        baseline=baseline,
        qmc=False,
    )

    def fn(params, model_state, batch, key):
        key_noise, key_loss = _seed(key), key
        leaves, treedef = jax.tree.flatten(params)

        def eps_of(copy):
            es_ = [
                _unit_noise(opts, key_noise, i, copy, x.shape, x.dtype)
                for i, x in enumerate(leaves)
            ]
            return jax.tree.unflatten(treedef, es_)

        def one(copy):
            eps = eps_of(copy)
            p = jax.tree.map(lambda x, e: x + sigma * e, params, eps)
            loss, aux = _split_loss(loss_fn(p, model_state, batch, key_loss), has_aux)
            return jnp.mean(loss), aux, eps

        copies = jnp.arange(opts["num_copies"])
        losses, aux, eps = jax.vmap(one)(copies)  # the N perturbed models exist anyway
        clean_loss, clean_aux = None, None
        if baseline == "clean":
            clean_loss, clean_aux = _split_loss(
                loss_fn(params, model_state, batch, key_loss), has_aux
            )
            clean_loss = jnp.mean(clean_loss)
        weights = _weights(losses, clean_loss, opts) / (opts["num_copies"] * sigma)
        grads = jax.tree.map(lambda e: jnp.tensordot(weights, e, axes=1), eps)
        loss = jnp.mean(losses) if clean_loss is None else clean_loss
        aux = _reduce_copies(aux) if clean_loss is None else clean_aux
        return ((loss, aux) if has_aux else loss), grads

    return fn


def evolution_strategies(**options) -> Callable:
    """An ES estimator factory: ``evolution_strategies(num_copies=..., sigma=...)(loss_fn)``.

    See `es`. Reference: Salimans et al. 2017, arXiv 1703.03864.
    """
    _validate(
        options.get("num_copies", 16),
        options.get("sigma", 0.01),
        "gaussian",
        options.get("antithetic", True),
        options.get("baseline", "none"),
    )
    return functools.partial(_es_estimator, options=options)


def _es_estimator(loss_fn, has_aux=True, *, options):
    return es(loss_fn, has_aux, **options)


def forward_evaluations(*, num_copies: int, baseline: str = "none", recompute: bool = False) -> int:
    """Forward evaluations per example of one ULR/ES gradient: N, +1 for a clean baseline.

    With ``recompute`` (ULR only) the N noisy passes run twice.
    """
    return num_copies * (2 if recompute else 1) + (baseline == "clean")
