"""ULR: gradients from noise-injected forward passes alone (Jiang et al., ICLR 2024).

For every Dense/Conv output ``o_l`` the model computes ``o_l + sigma_l e_l``
(N copies per example, one wide pass); the output cotangent is estimated as
``c_l = mean_n (L_n - b_n) psi(e_l) / sigma_l`` and the layer's local VJP maps
it to parameter gradients, ``g_l = J_{theta_l}(o_l)^T c_l`` (``x_l^T c_l`` for a
Dense layer). The copies run as one `jax.vmap`; each site's noise is drawn
for all copies at once, each independent draw once (antithetic partners
share theirs). For Dense/Conv layers the local VJP runs once per draw, not
per copy: the two copies of an antithetic pair share their noise, so their
weighted inputs are summed first (`_folded_vjp`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wspace import paths
from wspace.likelihood_ratio._copies import (
    check_options,
    forward_evaluations,
    reduce_copies,
    split_loss,
    validate,
    weights,
)
from wspace.likelihood_ratio._noise import _noise_key, num_pairs, pair_noise, score

PyTree = Any

LAYER_TYPES = (nn.Dense, nn.Conv)
_SIGNS, _PAIRS = "ulr_signs", "ulr_pairs"  # the vmap axes of the copies


@dataclasses.dataclass(frozen=True, eq=False)
class ULR:
    """A ULR gradient estimator: noise-injected forward passes alone, no backward pass.

    ``g_l = J_{theta_l}(o_l)^T mean_n (L_n - b_n) psi(e_{n,l}) / sigma_l`` for
    every Dense/Conv output ``o_l`` (module docstring). Build it with `ulr`
    (same options); the fields are its options and their defaults.

    Attributes:
      num_copies: N, noisy copies of each example (forward evaluations per example).
      sigma: noise scale (Gaussian std, Laplace/logistic scale), finite and > 0,
        or a mapping from layer path (``"Dense_0"``, ``"Block_0/Conv_1"``,
        ``"head"``) or path prefix (``"Block_0"``: its every layer) to scale; the
        longest matching key wins (`wspace.paths.by_prefix`).
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

    Calling it, ``est(loss_fn, has_aux=True)(params, model_state, batch, key) ->
    ((loss, aux), grads)`` (``(loss, grads)`` with ``has_aux=False``):
    ``loss_fn(params, model_state, batch, key)`` returns a loss of shape
    ``(B,)`` (per example, preferred) or a scalar; ``grads`` matches
    ``params`` (zeros outside perturbed layers); the package docstring says
    how ``loss`` and ``aux`` differ from `jax.value_and_grad`'s.

    Raises:
      ValueError: for an invalid option (before any work).

    Reference: Jiang, Zhang, Xu, Yu, Peng, ICLR 2024, arXiv 2305.08960.
    """

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
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        validate(self.num_copies, self.sigma, self.noise, self.antithetic, self.baseline, self.qmc)

    @property
    def forward_evaluations(self) -> int:
        """Forward evaluations per example of one gradient (see `forward_evaluations`)."""
        return forward_evaluations(
            num_copies=self.num_copies, baseline=self.baseline, recompute=self.recompute
        )

    def __call__(self, loss_fn: Callable, has_aux: bool = True) -> Callable:
        """``fn(params, model_state, batch, key) -> ((loss, aux), grads)``."""
        return functools.partial(_ulr_gradient, self, loss_fn, has_aux)


def ulr(**options: Any) -> ULR:
    """A ULR gradient estimator from keyword options: the fields of `ULR`, with its defaults.

    ``est = ulr(num_copies=16, sigma=0.1, baseline="mean")``, then
    ``est(loss_fn)(params, model_state, batch, key) -> ((loss, aux), grads)``
    and ``est.forward_evaluations`` (N per example, N + 1 with a clean baseline).

    Args:
      **options: ``num_copies``, ``sigma``, ``noise``, ``antithetic``, ``baseline``,
        ``layerwise``, ``qmc``, ``recompute``, ``layer_types`` (see `ULR`).

    Returns:
      A `ULR` estimator.

    Raises:
      ValueError: for an unknown or invalid option (before any work).

    Reference: Jiang, Zhang, Xu, Yu, Peng, ICLR 2024, arXiv 2305.08960.
    """
    check_options(ULR, options)
    return ULR(**options)


# ----------------------------------------------------------------------------- layers


def _is_site(context, layer_types) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, layer_types)


def _layer_name(module) -> str:
    return "/".join(str(p) for p in module.path)


def _sigma_of(sigma, name: str):
    """Layer ``name``'s sigma: ``sigma`` itself, or a mapping's value at the longest key
    that is the layer's path or a prefix of it (`wspace.paths.by_prefix`)."""
    if not isinstance(sigma, Mapping):
        return sigma
    value = paths.by_prefix(sigma, name)
    if value is None:
        raise ValueError(f"sigma mapping {dict(sigma)} lacks the perturbed layers {[name]}")
    return value


def perturbed_layers(
    loss_fn: Callable,
    params: PyTree,
    model_state: PyTree,
    batch: dict,
    key: jax.Array | None = None,
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
            return split_loss(loss_fn(p, s, b, k), has_aux)[0]

    jax.eval_shape(run, params, model_state, batch, key)
    return found


def _check_sites(sites, cfg: ULR) -> None:
    if not sites:
        names = ", ".join(t.__name__ for t in cfg.layer_types)
        raise ValueError(
            f"loss_fn's model has no layer of type ({names}) to perturb; ULR injects noise "
            "at Dense/Conv outputs (pass layer_types= for other flax modules)"
        )
    if isinstance(cfg.sigma, Mapping):
        missing = sorted({name for name, _ in sites if paths.by_prefix(cfg.sigma, name) is None})
        if missing:
            raise ValueError(
                f"sigma mapping {dict(cfg.sigma)} lacks the perturbed layers {missing}"
            )
    if cfg.layerwise and num_pairs(cfg.num_copies, cfg.antithetic) < len(sites):
        raise ValueError(
            f"layerwise needs at least one {'pair' if cfg.antithetic else 'copy'} per "
            f"perturbed layer: num_copies={cfg.num_copies} for {len(sites)} layers"
        )


def _copies_per_site(cfg: ULR, num_sites: int) -> list[int]:
    """``M_l``: copies whose noise reaches site ``l`` (all N, or its round-robin share)."""
    if not cfg.layerwise:
        return [cfg.num_copies] * num_sites
    n_pairs = num_pairs(cfg.num_copies, cfg.antithetic)
    assigned = [(c % n_pairs) % num_sites for c in range(cfg.num_copies)]
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


# ----------------------------------------------------------------------------- scheduling


def _after(value, x, axis_names=()):
    """``value``, made data-dependent on ``x`` so XLA cannot compute with it early.

    ``x != x`` is false except for NaN, and XLA may not fold it away; the
    value is unchanged for finite inputs. Used in ``recompute`` mode, whose
    point is that no two layers' noise or inputs are held at once (an
    optimisation barrier does not survive XLA:CPU's pipeline). Under the
    copies' `jax.vmap` the probe is summed over ``axis_names`` so that
    ``value`` stays unbatched (a site's noise is drawn once for all copies).
    """
    probe = jnp.ravel(x)[0]
    if axis_names:
        probe = jax.lax.psum(probe, axis_names)
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.where(probe != probe, jnp.nan, value)
    return value + (probe != probe).astype(value.dtype)


# ----------------------------------------------------------------------------- estimator


def _site_noise(cfg: ULR, key_noise, site, pair, shape, num_sites: int, i: int):
    """Unit noise of draw ``pair`` (one antithetic pair, or one copy) at perturbed site ``i``.

    With ``layerwise`` the draws of pairs assigned to other sites are zeroed.
    """
    n_pairs = num_pairs(cfg.num_copies, cfg.antithetic)
    e = pair_noise(key_noise, site, pair, shape, noise=cfg.noise, num_pairs=n_pairs, qmc=cfg.qmc)
    if cfg.layerwise:
        e = e * (pair % num_sites == i).astype(e.dtype)
    return e


def _pair_draws(cfg: ULR, key_noise, site, shape, num_sites: int, i: int) -> jax.Array:
    """``(P, *shape)`` float32: the ``P`` independent draws (`num_pairs`) at site ``i``, each once.

    Stacked by `jax.lax.map`, a loop whose output XLA stores: drawn under a
    vmap instead, the threefry hash fuses into each consumer (the noisy
    forward of both signs, the cotangent) and is computed once for each (an
    optimisation barrier does not survive XLA:CPU's pipeline).
    """
    n_pairs = num_pairs(cfg.num_copies, cfg.antithetic)
    draw = lambda pair: _site_noise(cfg, key_noise, site, pair, shape, num_sites, i)
    return jax.lax.map(draw, jnp.arange(n_pairs))


def _signs(cfg: ULR) -> jax.Array:
    """The sign of copy ``n = s P + p`` on its draw: ``[+1]``, or ``[+1, -1]`` (antithetic)."""
    return jnp.array([1.0, -1.0] if cfg.antithetic else [1.0])


def _every_copy_noise(cfg: ULR, key_noise, site, shape, num_sites: int, i: int):
    """``(N, *shape)``: every copy's unit noise at site ``i``, as the one-pass copies see it."""
    e = _pair_draws(cfg, key_noise, site, shape, num_sites, i)
    signs = _signs(cfg).reshape((-1, 1) + (1,) * len(shape))
    return (signs * e).reshape((cfg.num_copies,) + tuple(shape))


def _noisy_copies(cfg: ULR, loss_fn, has_aux, sites, model_state, batch, key_noise, key_loss):
    """``wide(params) -> ((outs, thetas), (losses, aux, noises, inputs))``: the N noisy passes.

    Two nested vmaps: over the signs (outer) and the ``P`` independent draws
    (inner), so copy ``n = s P + p`` is copy-major (partner ``n + N/2``).
    The noise of every site is drawn first (`_pair_draws`, ``(P, *shape)``)
    and enters the inner vmap as an input: each copy reads its own draw, no
    gather, and ``noises`` are these draws. Per perturbed site, in call
    order, ``wide.folded[i]`` says how its gradient is formed: ``None``, by
    the VJP of its noise-free output (in ``outs``, per copy ``(S, P, ...)``);
    else the unbound layer, whose parameters as the model used them
    (``thetas``) and inputs (``inputs``, per copy) feed `_folded_vjp`. The
    losses and ``aux`` come back per copy. In ``recompute`` mode (the noises
    are not kept) each site draws its noise in the pass instead, once its
    input exists (`_after`), so that no two layers' noise is held at once.
    """
    num_sites = len(sites)
    folded: list = []

    def one_copy(p, sign, pair, drawn):
        counter, outs, thetas, inputs = [0], [], [], []

        def intercept(next_fun, args, kwargs, context):
            if not _is_site(context, cfg.layer_types):
                return next_fun(*args, **kwargs)
            i = counter[0]
            counter[0] += 1
            x = jax.lax.stop_gradient(args[0])  # local VJP only: no path through x
            out = next_fun(x, *args[1:], **kwargs)
            if drawn is None:
                site = _after(jnp.uint32(i), x, (_SIGNS, _PAIRS))
                e = _pair_draws(cfg, key_noise, site, out.shape, num_sites, i)[pair]
            else:
                e = drawn[i]
            if drawn is not None and _foldable(context, args, kwargs):
                folded.append(context.module.clone(parent=None))
                thetas.append(context.module.variables["params"])
                inputs.append(x)
            else:
                folded.append(None)
                outs.append(out)
            sigma = _sigma_of(cfg.sigma, _layer_name(context.module))
            return out + (sigma * sign * e).astype(out.dtype)

        with nn.intercept_methods(intercept):
            loss, aux = split_loss(loss_fn(p, model_state, batch, key_loss), has_aux)
        return (outs, thetas), (loss, aux, inputs)

    axes = ((0, None), (0, 0, 0))  # thetas do not depend on the copy
    per_pair = jax.vmap(one_copy, (None, None, 0, 0), axes, axis_name=_PAIRS)
    copies = jax.vmap(per_pair, (None, 0, None, None), axes, axis_name=_SIGNS)
    pairs = jnp.arange(num_pairs(cfg.num_copies, cfg.antithetic))
    noises = None
    if not cfg.recompute:
        noises = [
            _pair_draws(cfg, key_noise, i, shape, num_sites, i)
            for i, (_, shape) in enumerate(sites)
        ]

    def wide(p):
        folded.clear()
        primal, (losses, aux, inputs) = copies(p, _signs(cfg), pairs, noises)
        return primal, (losses, aux, noises, inputs)

    wide.folded = folded  # type: ignore[attr-defined]  # filled when wide is traced
    return wide


def _foldable(context, args, kwargs) -> bool:
    """Whether a site's parameter VJP may be folded over the copies of a pair (`_folded_vjp`).

    Exactly `flax.linen.Dense` and `flax.linen.Conv` (a subclass may compute
    something else) called on one input with a leading example axis: per
    example their output is ``A(x; kernel) + bias`` with ``A`` linear in ``x``.
    """
    dense_or_conv = type(context.module) in (nn.Dense, nn.Conv)
    return dense_or_conv and len(args) == 1 and not kwargs and jnp.ndim(args[0]) >= 2


def _folded_vjp(layer, theta, x, psi, w_signed) -> PyTree:
    """``sum_{s,p} J_theta(x_{s,p})^T (w_{s,p} sign_s psi_p)`` for a Dense/Conv layer, over P rows.

    Per example the output is ``A(x; kernel) + bias`` with ``A`` linear in
    ``x``, so the kernel's VJP ``A(x)^T c`` is bilinear: a per-example factor
    moves from the cotangent to the input and the copies of a pair, which
    share ``psi``, fold into one, ``sum_s A(x_s)^T (w_s sign_s psi) =
    A(x~)^T psi`` with ``x~ = sum_s sign_s w_s x_s``: one transposed product
    over P draws instead of N copies (half the rows with antithetic pairs).
    The bias's VJP does not depend on ``x``: ``J(0)^T (dw psi)``,
    ``dw = sum_s sign_s w_s``, one example's (summed over examples). The
    same sum as the per-copy VJP, up to rounding.

    Args:
      layer: the unbound layer.
      theta: its parameters as the model used them (``kernel``, ``bias``).
      x: its inputs per copy, ``(S, P, B, ...)``.
      psi: ``psi(dtype)``: per draw the score ``psi(e)`` in ``dtype``, ``(P, B, ...)``.
      w_signed: ``sign_s w_{s,p}`` (any constant factor of ``psi`` included),
        ``(S, P)`` or ``(S, P, B)``.

    Returns:
      The gradient with respect to ``theta``.
    """
    out_dtype = jax.eval_shape(lambda: layer.apply({"params": theta}, x[0, 0])).dtype
    psi = psi(out_dtype)
    expand = lambda a, ndim: a.reshape(a.shape + (1,) * (ndim - a.ndim))
    # unrolled sums over the signs (a jnp.sum over that axis becomes a dot on XLA:CPU)
    x_fold = sum(expand(w_signed[s], x.ndim - 1) * x[s] for s in range(len(x)))
    dw = sum(w_signed[s] for s in range(len(x)))
    dw_psi = jnp.sum(expand(dw, psi.ndim) * psi, (0, 1), keepdims=True)[0]

    def transpose(inputs, cot):  # J(inputs)^T cot: the layer is linear in its parameters
        apply = lambda t: layer.apply({"params": t}, inputs)
        return jax.linear_transpose(apply, theta)(cot.astype(out_dtype))[0]

    rows = lambda a: a.reshape((-1,) + a.shape[2:])
    g = transpose(jnp.zeros((1,) + x.shape[3:], x.dtype), dw_psi)  # the bias
    g["kernel"] = transpose(rows(x_fold.astype(x.dtype)), rows(psi))["kernel"]
    return g


def _ulr_gradient(cfg: ULR, loss_fn, has_aux, params, model_state, batch, key):
    """The ULR estimate (see `ULR`)."""
    key_noise, key_loss = _noise_key(key), key
    sites = perturbed_layers(
        loss_fn, params, model_state, batch, key_loss, has_aux=has_aux, layer_types=cfg.layer_types
    )
    _check_sites(sites, cfg)
    per_layer = _copies_per_site(cfg, len(sites))
    wide = _noisy_copies(cfg, loss_fn, has_aux, sites, model_state, batch, key_noise, key_loss)

    # Pass 1 (the only one unless recompute): losses, and layer outputs/inputs for the VJP.
    if cfg.recompute:
        _, (losses, aux, _, _) = wide(params)
    else:
        primal, vjp_fn, (losses, aux, noises, inputs) = jax.vjp(wide, params, has_aux=True)
    losses, aux = jax.tree.map(lambda a: a.reshape((cfg.num_copies,) + a.shape[2:]), (losses, aux))
    losses = _check_losses(losses, sites)
    clean_loss, clean_aux = None, None
    if cfg.baseline == "clean":
        clean_loss, clean_aux = split_loss(loss_fn(params, model_state, batch, key_loss), has_aux)
    w = weights(losses, clean_loss, cfg)  # (N,) or (N, B): scale of psi per copy

    if cfg.recompute:
        # Pass 2 starts only once the weights exist (else XLA runs its forward early
        # and keeps every layer input waiting for them).
        batch_w = jax.tree.map(lambda a: _after(a, w), batch)
        grads = _second_pass(
            cfg, loss_fn, params, model_state, batch_w, key_noise, key_loss, w, per_layer
        )
    else:
        (grads,) = vjp_fn(
            _cotangents(cfg, sites, wide.folded, primal, noises, inputs, w, per_layer)
        )

    loss = jnp.mean(losses) if clean_loss is None else jnp.mean(clean_loss)
    aux = reduce_copies(aux) if clean_loss is None else clean_aux
    return ((loss, aux) if has_aux else loss), grads


def _cotangents(cfg: ULR, sites, folded, primal, noises, inputs, w, per_layer):
    """The cotangents of ``wide``'s ``(outs, thetas)``: the estimate, site by site.

    Copy ``(s, p)`` has noise ``sign_s e_p``, so its output cotangent is
    ``c = w_{s,p} sign_s psi(e_p) / M`` (psi is odd); a folded site gets the
    parameter gradient `_folded_vjp` forms from the same ``c``.
    """
    signs = _signs(cfg)
    w_signed = w.reshape(signs.shape + (-1,) + w.shape[1:])
    w_signed = w_signed * signs.reshape((-1,) + (1,) * (w_signed.ndim - 1))
    outs, thetas = iter(primal[0]), iter(primal[1])
    inputs = iter(inputs)
    out_cots, theta_cots = [], []
    for (name, _), layer, e, m in zip(sites, folded, noises, per_layer, strict=True):
        scale = 1 / (_sigma_of(cfg.sigma, name) * m)  # psi(e) = score(e, 1) / sigma, all families
        unit_score = lambda dtype, e=e: score(cfg.noise, e.astype(dtype), 1.0)
        if layer is None:
            out = next(outs)
            w_out = w_signed.reshape(w_signed.shape + (1,) * (out.ndim - w_signed.ndim))
            out_cots.append((w_out * scale * unit_score(out.dtype)).astype(out.dtype))
        else:
            theta = next(thetas)
            theta_cots.append(_folded_vjp(layer, theta, next(inputs), unit_score, w_signed * scale))
    return out_cots, theta_cots


# ----------------------------------------------------------------------------- recompute


def _per_copy_batchnorm(context, args, kwargs, n):
    """A BatchNorm call on the copy-major tiled batch, normalised per copy (vmapped apply)."""
    x = args[0]
    layer = context.module.clone(parent=None)
    variables = dict(context.module.variables)

    def one(xi):
        out, _ = layer.apply(variables, xi, *args[1:], **kwargs, mutable=["batch_stats"])
        return out

    return jax.vmap(one)(x.reshape((n, -1) + x.shape[1:])).reshape(x.shape)


def _second_pass(
    cfg, loss_fn, params, model_state, batch, key_noise, key_loss, copy_weights, per_layer
):
    """Recompute mode: one tiled noisy pass that forms each layer's gradient on the spot.

    The batch is tiled N times (copy-major, the order of the first pass, so
    the noise and layer inputs are identical; BatchNorm normalises each
    copy's block separately, as the vmapped pass does); at each perturbed
    layer the cotangent ``c = w psi(e) / M_l`` is known already and the
    layer's local VJP runs at once; an optimisation barrier makes the next
    layer wait for it, so each layer input dies before the next layer runs.
    """
    n = cfg.num_copies
    tiled = jax.tree.map(lambda a: jnp.concatenate([a] * n, 0), batch)
    counter, inside = [0], [False]
    acc: dict[tuple[str, ...], PyTree] = {}  # per-layer parameter gradients, summed over calls

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
        e = _every_copy_noise(cfg, key_noise, site, per_copy, len(per_layer), i).astype(out.dtype)
        sigma = _sigma_of(cfg.sigma, _layer_name(context.module))
        w = copy_weights.reshape(copy_weights.shape + (1,) * (e.ndim - copy_weights.ndim))
        cot = (w * score(cfg.noise, e, sigma) / per_layer[i]).reshape(out.shape)
        (g,) = vjp(cot)
        g, noisy = jax.lax.optimization_barrier((g, out + sigma * e.reshape(out.shape)))
        path = tuple(context.module.path)
        acc[path] = g if path not in acc else jax.tree.map(jnp.add, acc[path], g)
        return noisy

    with nn.intercept_methods(intercept):
        loss_fn(params, model_state, tiled, key_loss)  # the loss itself is dead code
    return _scatter_grads(params, acc)


def _scatter_grads(params, acc: dict):
    """Per-layer gradients (by module path) into a zero tree shaped like ``params``."""
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


# ----------------------------------------------------------------------------- noise control


def noisy_loss(
    loss_fn: Callable,
    *,
    sigma: float | Mapping[str, float] = ULR.sigma,
    noise: str = ULR.noise,
    layer_types: tuple = LAYER_TYPES,
) -> Callable:
    """``loss_fn`` with ULR's noise injected: ``o_l + sigma e_l`` at every Dense/Conv output.

    The control arm that separates ULR's estimator from its noise: trained by
    backprop (`jax.value_and_grad`), the model sees the noise ULR injects,
    drawn exactly as copy 0 of `ulr` draws it from the same key (the noisy
    pass of ``ulr(num_copies=1)``).

    Args:
      loss_fn: the library's loss signature.
      sigma: noise scale (finite, > 0), or a mapping from layer path or prefix to scale
        (as `ULR`'s).
      noise: ``gaussian``, ``laplace`` or ``logistic``.
      layer_types: flax module classes that receive noise.

    Returns:
      ``noisy(params, model_state, batch, key)`` with ``loss_fn``'s outputs; ``key``
      (required) draws the noise and is passed on to ``loss_fn``.
    """
    validate(1, sigma, noise, False, "none")

    def noisy(params, model_state, batch, key):
        key_noise, counter = _noise_key(key), [0]

        def intercept(next_fun, args, kwargs, context):
            if not _is_site(context, layer_types):
                return next_fun(*args, **kwargs)
            i = counter[0]
            counter[0] += 1
            out = next_fun(*args, **kwargs)
            e = pair_noise(key_noise, i, 0, out.shape, noise=noise, dtype=out.dtype)
            return out + _sigma_of(sigma, _layer_name(context.module)) * e

        with nn.intercept_methods(intercept):
            return loss_fn(params, model_state, batch, key)

    return noisy
