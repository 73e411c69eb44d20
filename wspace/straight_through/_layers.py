"""Flax layers with stochastic binary weights and/or activations.

`BinaryDense`, `BinaryConv`, `BinaryMLP`; `sampled_predictions` predicts with the mean of
several stochastic passes. Each array of binary units is a *site*
that samples (``train=True``), takes the most probable state (``train=False``),
or, for exact enumeration (`wspace.straight_through._enumeration`), takes states
injected through the variable collections below and sows their log-probability.

Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wspace.straight_through._estimators import (
    ESTIMATORS,
    NOISES,
    check_choice,
    log_prob,
    sign_ste,
    stochastic_sign,
    straight_through,
)

LAYER_ESTIMATORS = ESTIMATORS + ("deterministic",)
LATENT = "latent"  # the param name of Bernoulli weights' latents (see `latent_labels`)
# The collections that connect the layers to exact enumeration:
SAMPLES = "binary_samples"  # sown sampled states (their shapes define the enumeration)
STATES = "binary_states"  # injected states, held constant (exact expectations)
STATES_ST = "binary_states_st"  # injected states with the layer's ST backward
LOGP = "binary_logp"  # sown log-probability of the injected states


def _binary_site(
    mdl: nn.Module, name: str, a, *, noise: str, estimator: str, train: bool, rng_collection: str
):
    """One array of binary units inside a flax module: sample, most-probable, or injected."""
    for col in (STATES, STATES_ST):
        if estimator != "deterministic" and mdl.has_variable(col, name):
            s = jnp.broadcast_to(mdl.get_variable(col, name), a.shape).astype(a.dtype)
            mdl.sow(
                LOGP,
                name,
                jnp.sum(log_prob(s, a, noise)),
                init_fn=lambda: 0.0,
                reduce_fn=lambda acc, v: acc + v,
            )
            if col == STATES:
                return jax.lax.stop_gradient(s)
            return straight_through(s, a, noise=noise, estimator=estimator)
    if estimator == "deterministic":
        return sign_ste(a)
    if not train:
        return jnp.where(a >= 0, 1.0, -1.0).astype(a.dtype)
    x = stochastic_sign(mdl.make_rng(rng_collection), a, noise=noise, estimator=estimator)
    mdl.sow(SAMPLES, name, x, init_fn=lambda: None, reduce_fn=lambda _, v: v)
    return x


def _latent_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


class _BinaryLayer(nn.Module):
    """Shared fields and the weight/activation logic of `BinaryDense` and `BinaryConv`."""

    features: int = 1
    binary_weights: bool = True
    activation: str | None = "st"
    noise: str = "logistic"
    weight_estimator: str = "identity"
    weight_noise: str = "logistic"
    use_bias: bool = True
    use_scale: bool = True
    rng_collection: str = "dropout"

    def _validate(self):
        check_choice(self.noise, NOISES, "noise")
        check_choice(self.weight_noise, NOISES, "weight noise")
        check_choice(self.weight_estimator, ESTIMATORS, "weight estimator")
        if self.activation is not None:
            check_choice(self.activation, LAYER_ESTIMATORS, "activation estimator")

    def _kernel(self, shape, fan_in, train):
        if not self.binary_weights:
            return self.param("kernel", nn.initializers.lecun_normal(), shape)
        latent = self.param(LATENT, _latent_init, shape)
        w = _binary_site(
            self,
            "weights",
            latent,
            noise=self.weight_noise,
            estimator=self.weight_estimator,
            train=train,
            rng_collection=self.rng_collection,
        )
        return w / math.sqrt(fan_in)  # keeps the pre-activation O(1) at init

    def _finish(self, y, train):
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (y.shape[-1],))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (y.shape[-1],))
        if self.activation is None:
            return y
        return _binary_site(
            self,
            "activations",
            y,
            noise=self.noise,
            estimator=self.activation,
            train=train,
            rng_collection=self.rng_collection,
        )


class BinaryDense(_BinaryLayer):
    """Dense layer with stochastic binary weights and/or activations.

    ``a = gain * (x @ W) + b`` with ``W = w / sqrt(fan_in)``, ``w = +-1``,
    ``P(w = +1) = F(latent)`` (or a real ``kernel`` if ``binary_weights=False``);
    output ``sign(a - z)`` with an ST backward (or ``a`` if ``activation=None``).

    Attributes:
      features: output units.
      binary_weights: Bernoulli weights from a latent param ``latent`` (else real ``kernel``).
      activation: estimator of the binary activation (`ESTIMATORS` or
        ``"deterministic"`` for `sign_ste`), or None for a linear output.
      noise / weight_noise: activation / weight noise, one of `NOISES`.
      weight_estimator: ``identity`` (mirror-descent gradients) or another of `ESTIMATORS`.
      use_bias / use_scale: learnable per-unit bias and gain.
      rng_collection: the flax rng stream the noise comes from (``"dropout"``).

    ``__call__(x, train=False)``: ``train=False`` uses the most probable states.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._validate()
        w = self._kernel((x.shape[-1], self.features), x.shape[-1], train)
        return self._finish(x @ w, train)


class BinaryConv(_BinaryLayer):
    """Convolution with stochastic binary weights and/or activations (channels last).

    Same model as `BinaryDense` with ``x @ W`` replaced by a 1-D (``(N, L, C)``)
    or 2-D (``(N, H, W, C)``) convolution; ``fan_in = prod(kernel_size) * C``.

    Attributes:
      features: output channels.
      kernel_size: window, e.g. ``(3,)`` or ``(3, 3)``.
      strides: stride per spatial axis (default 1).
      padding: ``"SAME"`` or ``"VALID"``.
      (others as in `BinaryDense`)

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """

    kernel_size: Sequence[int] = (3,)
    strides: Sequence[int] | None = None
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x, train: bool = False):
        self._validate()
        nd = len(self.kernel_size)
        if x.ndim != nd + 2:
            raise ValueError(
                f"BinaryConv with a {nd}-D kernel needs (N, spatial..., C) inputs "
                f"of rank {nd + 2}, got shape {x.shape}"
            )
        cin = x.shape[-1]
        shape = (*self.kernel_size, cin, self.features)
        w = self._kernel(shape, math.prod(self.kernel_size) * cin, train)
        spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[nd]
        y = jax.lax.conv_general_dilated(
            x,
            w.astype(x.dtype),
            tuple(self.strides or (1,) * nd),
            self.padding,
            dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, spec),
        )
        return self._finish(y, train)


class BinaryMLP(nn.Module):
    """MLP of `BinaryDense` layers with binary activations and a real linear ``head``.

    Attributes:
      features: hidden widths (each a layer of stochastic binary units).
      num_classes: outputs of the real-valued ``head``.
      activation, noise, binary_weights, weight_estimator, weight_noise,
      rng_collection: passed to every hidden `BinaryDense`. ``activation="sign"``
        (for forward-only estimators): each hidden `BinaryDense` outputs its
        pre-activation ``a`` and the MLP applies a hard ``sign`` with no noise of
        its own and no gradient. A forward-only estimator that adds noise ``z`` to
        every `BinaryDense` output then runs the SBN ``sign(a + z)``: ULR with
        logistic noise of scale 1 samples exactly the SBN with ``noise="logistic"``
        (``P(x = +1) = sigmoid(a)``), Gaussian noise of scale 1 the ``"gaussian"``
        SBN. The parameter tree is the same as with ``activation="st"``, so
        `exact_value_and_grad` of the ``"st"`` model is its ground truth.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880 (the [2, 5, 5, 5] toy
    is ``BinaryMLP((5, 5, 5), num_classes=2, binary_weights=False)``).
    """

    features: Sequence[int] = (5, 5, 5)
    num_classes: int = 2
    # passed to every hidden `BinaryDense`, with its defaults (but real weights by default)
    activation: str = _BinaryLayer.activation  # type: ignore[assignment]  # "st"; None not allowed here
    noise: str = _BinaryLayer.noise
    binary_weights: bool = False
    weight_estimator: str = _BinaryLayer.weight_estimator
    weight_noise: str = _BinaryLayer.weight_noise
    rng_collection: str = _BinaryLayer.rng_collection

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_choice(self.activation, LAYER_ESTIMATORS + ("sign",), "activation estimator")
        x = x.reshape((x.shape[0], -1))
        external = self.activation == "sign"
        for width in self.features:
            x = BinaryDense(
                width,
                binary_weights=self.binary_weights,
                activation=None if external else self.activation,
                noise=self.noise,
                weight_estimator=self.weight_estimator,
                weight_noise=self.weight_noise,
                rng_collection=self.rng_collection,
            )(x, train)
            if external:  # noise added to the BinaryDense output from outside (e.g. by ULR)
                x = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
        return nn.Dense(self.num_classes, name="head")(x)


@functools.partial(jax.jit, static_argnames=("apply_fn", "rng_collection"))
def sampled_predictions(
    apply_fn: Callable, params: Any, x: jax.Array, keys: jax.Array, rng_collection: str = "dropout"
) -> jax.Array:
    """Class predictions of a stochastic network: ``argmax_c mean_k softmax(f(x; k))_c``.

    One stochastic pass (``train=True``) per key; the mean of the S passes' class
    probabilities estimates the network's expected prediction, which the mode network
    (``train=False``: every unit at its most probable state) only approximates.

    Args:
      apply_fn: a flax ``apply`` (e.g. `BinaryMLP`'s), hashable: compiled once per function.
      params: its ``params``.
      x: inputs ``[N, ...]``.
      keys: ``[S, 2]`` PRNG keys, one per pass (passes run one after another: `jax.lax.map`).
      rng_collection: the rng stream of the binary units.

    Returns:
      int predictions ``[N]``.
    """

    def probabilities(key):
        logits = apply_fn({"params": params}, x, train=True, rngs={rng_collection: key})
        return jax.nn.softmax(logits)

    return jnp.argmax(jnp.mean(jax.lax.map(probabilities, keys), 0), -1)
