"""Stochastic binary networks, straight-through (ST) estimators, and exact gradients.

A stochastic binary unit is ``x = sign(a - z)`` with noise ``z`` of CDF ``F``, so
``P(x = +1) = F(a)`` and ``E[x] = 2F(a) - 1``. The *principled* ST estimator
(Shekhovtsov & Yanush 2021, arXiv 2006.06880) samples ``x`` on the forward pass
and multiplies the backward signal by ``dE[x]/da = 2F'(a)``, i.e. it
differentiates ``x + (2F(a) - 1) - stop_gradient(2F(a) - 1)``. It is exact
when the loss is affine in each unit. The empirical proxies are special
cases or mismatches: ``hardtanh`` (``1{|a| <= 1}``) is the principled ST for
uniform noise on [-1, 1]; ``tanh(a/2)`` is the principled ST for logistic
noise (the common ``tanh(a)`` proxy corresponds to logistic noise of scale
1/2); ``identity`` passes the gradient through unchanged.

Bernoulli weights ``w = +-1`` with ``P(w = +1) = F(eta)`` are the same unit
applied to a latent ``eta``. With the ``identity`` weight estimator the
gradient with respect to ``eta`` is the ST estimate of the gradient with
respect to the mean ``mu = E[w]``; a plain step on ``eta`` with it is mirror
descent on ``mu`` with the mirror map ``eta = F^{-1}((mu + 1)/2)``
(`mirror_descent`). With ``st`` it is ``2F'(eta)`` times that: plain SGD on
the latent weights.

Pieces:

* `stochastic_sign`, `bernoulli_weights`, `sign_ste` (deterministic sign with
  the classic clipped STE of Hubara et al. 2016): `jax.custom_vjp` functions.
* `BinaryDense`, `BinaryConv`, `BinaryMLP`: flax layers with stochastic binary
  weights and/or activations. Their noise comes from the flax rng stream
  ``rng_collection`` (default ``"dropout"``, the stream that
  `wspace.training.classification_loss` feeds). ``train=False`` uses the most
  probable state (``sign(a)``, ``sign(eta)``), no rng needed.
* `mirror_descent`: the optax update of latent weights (``optax.sgd``, plus
  `clip_latents` for the clipped-latent variant); `latent_labels` for
  ``optax.multi_transform``.
* Ground truth and baselines: `states_loss` turns a model built from these
  layers into a function of its binary states, `exact_value_and_grad`
  enumerates all ``2^n`` states of one example, `expected_estimate` gives the
  exact mean of an ST estimator, `reinforce` the unbiased score-function
  estimator. Enumeration computes at ``Precision.HIGHEST``. Judging an
  estimator against the exact gradient (bias, variance, cosine vs samples)
  is `wspace.estimators`; the old names here are deprecated aliases.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace import estimators, training

NOISES = ("logistic", "uniform", "gaussian")
ESTIMATORS = ("st", "identity", "hardtanh", "tanh")
LAYER_ESTIMATORS = ESTIMATORS + ("deterministic",)
MAX_UNITS = 20

_SAMPLES = "binary_samples"  # sown sampled states (their shapes define the enumeration)
_STATES = "binary_states"  # injected states, held constant (exact expectations)
_STATES_ST = "binary_states_st"  # injected states with the layer's ST backward
_LOGP = "binary_logp"  # sown log-probability of the injected states

PyTree = Any


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(allowed)}")


# --------------------------------------------------------------------------- noise


def noise_cdf(a: jax.Array, noise: str = "logistic") -> jax.Array:
    """``F(a) = P(z < a)``: the probability that ``sign(a - z) = +1``.

    logistic: ``sigmoid(a)``; uniform on [-1, 1]: ``clip((a + 1)/2, 0, 1)``;
    gaussian (standard normal): ``Phi(a)``.
    """
    _check(noise, NOISES, "noise")
    if noise == "logistic":
        return jax.nn.sigmoid(a)
    if noise == "uniform":
        return jnp.clip((a + 1.0) / 2.0, 0.0, 1.0)
    return jax.scipy.stats.norm.cdf(a)


def noise_pdf(a: jax.Array, noise: str = "logistic") -> jax.Array:
    """``F'(a)``, the noise density (see `noise_cdf`)."""
    _check(noise, NOISES, "noise")
    if noise == "logistic":
        s = jax.nn.sigmoid(a)
        return s * (1.0 - s)
    if noise == "uniform":
        return jnp.where(jnp.abs(a) <= 1.0, 0.5, 0.0).astype(jnp.result_type(a))
    return jax.scipy.stats.norm.pdf(a)


def _log_prob(s: jax.Array, a: jax.Array, noise: str) -> jax.Array:
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
    _check(noise, NOISES, "noise")
    _check(estimator, ESTIMATORS, "estimator")
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
    _check(noise, NOISES, "noise")
    _check(estimator, ESTIMATORS, "estimator")
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


# ------------------------------------------------------------------------ layers


def _binary_site(
    mdl: nn.Module, name: str, a, *, noise: str, estimator: str, train: bool, rng_collection: str
):
    """One array of binary units inside a flax module: sample, most-probable, or injected."""
    for col in (_STATES, _STATES_ST):
        if estimator != "deterministic" and mdl.has_variable(col, name):
            s = jnp.broadcast_to(mdl.get_variable(col, name), a.shape).astype(a.dtype)
            mdl.sow(
                _LOGP,
                name,
                jnp.sum(_log_prob(s, a, noise)),
                init_fn=lambda: 0.0,
                reduce_fn=lambda acc, v: acc + v,
            )
            if col == _STATES:
                return jax.lax.stop_gradient(s)
            return _straight_through(jax.lax.stop_gradient(s), a, noise, estimator)
    if estimator == "deterministic":
        return sign_ste(a)
    if not train:
        return jnp.where(a >= 0, 1.0, -1.0).astype(a.dtype)
    x = stochastic_sign(mdl.make_rng(rng_collection), a, noise=noise, estimator=estimator)
    mdl.sow(_SAMPLES, name, x, init_fn=lambda: None, reduce_fn=lambda _, v: v)
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
        _check(self.noise, NOISES, "noise")
        _check(self.weight_noise, NOISES, "weight noise")
        _check(self.weight_estimator, ESTIMATORS, "weight estimator")
        if self.activation is not None:
            _check(self.activation, LAYER_ESTIMATORS, "activation estimator")

    def _kernel(self, shape, fan_in, train):
        if not self.binary_weights:
            return self.param("kernel", nn.initializers.lecun_normal(), shape)
        latent = self.param("latent", _latent_init, shape)
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
    activation: str = "st"
    noise: str = "logistic"
    binary_weights: bool = False
    weight_estimator: str = "identity"
    weight_noise: str = "logistic"
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check(self.activation, LAYER_ESTIMATORS + ("sign",), "activation estimator")
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


def latent_labels(params: PyTree) -> PyTree:
    """Labels each leaf ``"latent"`` (a binary layer's latent weights) or ``"real"``.

    For ``optax.multi_transform({"latent": mirror_descent(...), "real": ...}, latent_labels)``.
    """

    def label(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return "latent" if name == "latent" else "real"

    return jax.tree_util.tree_map_with_path(label, params)


# ------------------------------------------------------------------------- optax


def clip_latents(bound: float) -> optax.GradientTransformationExtraArgs:
    """Projects the next latent weights into ``[-bound, bound]``: ``u <- clip(p + u) - p``.

    The projection step of clipped-latent mirror descent (BinaryConnect's
    clipping); put it last in a chain. Needs ``params`` in ``update``.

    Args:
      bound: ``c > 0``; the new latents are ``clip(params + updates, -c, c)``.

    Returns:
      An optax ``GradientTransformationExtraArgs``.

    Reference: Courbariaux et al. 2015, arXiv 1511.00363; Shekhovtsov & Yanush
    2021, arXiv 2006.06880, Sec. 4 (the clipping as a mirror-descent projection).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("clip_latents (mirror_descent(clip=...)) needs params in update()")
        new = jax.tree.map(lambda u, p: jnp.clip(p + u, -bound, bound) - p, updates, params)
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mirror_descent(
    learning_rate: float | Callable, *, clip: float | None = None
) -> optax.GradientTransformation:
    """Mirror descent on Bernoulli weight probabilities, as a step on the latent weights.

    With ``mu = E[w] = 2F(eta) - 1`` and the mirror map ``grad Phi(mu) =
    F^{-1}((mu + 1)/2) = eta``, mirror descent is ``eta <- eta - lr * g`` with
    ``g`` the (ST) gradient with respect to ``mu``, which is what the
    ``identity`` weight estimator delivers as the gradient of ``eta``
    (`bernoulli_weights`). So without ``clip`` this *is* ``optax.sgd(lr)``
    applied to the latents (and returns it). For logistic noise it is the
    exponentiated-gradient update of ``P(w = +1)``. ``clip=c`` chains
    `clip_latents`: ``eta <- clip(eta - lr g, -c, c)``; with uniform noise on
    [-1, 1] and ``c = 1`` the mirror map is the identity on [-1, 1] and this is
    projected gradient descent on ``mu`` (the latent clipping of BinaryConnect).

    Args:
      learning_rate: a number or an optax schedule ``count -> lr``.
      clip: optional bound on ``|eta|`` (then ``update`` needs ``params``).

    Returns:
      ``optax.sgd(learning_rate)``, or that chained with ``clip_latents(clip)``.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880, Sec. 4.
    """
    training.check_learning_rate(learning_rate)
    if clip is None:
        return optax.sgd(learning_rate)
    return optax.chain(optax.sgd(learning_rate), clip_latents(clip))


# ------------------------------------------------------------ exact enumeration


def all_states(num_units: int, *, max_units: int = MAX_UNITS) -> jax.Array:
    """All ``2^n`` joint states of ``n`` binary units as a ``(2^n, n)`` array of +-1.

    Raises:
      ValueError: if ``n > max_units`` (the message says how many states that would be).
    """
    if not isinstance(num_units, int | np.integer) or num_units < 0:
        raise ValueError(f"num_units must be a non-negative int, got {num_units!r}")
    if num_units > max_units:
        raise ValueError(
            f"cannot enumerate {num_units} binary units: that is 2**{num_units} = "
            f"{2**num_units:,} states; at most max_units={max_units} "
            f"({2**max_units:,} states) are allowed"
        )
    idx = np.arange(2**num_units)[:, None]
    bits = (idx >> np.arange(num_units)[None, :]) & 1
    return jnp.asarray(2.0 * bits - 1.0, jnp.float32)


class StatesLoss(NamedTuple):
    """A network as a function of its binary states (one example).

    ``fn(params, states, x1, y1) -> (loss, log_prob)``: the loss with the units
    set to ``states`` (a flat ``(num_units,)`` +-1 vector) and ``log P(states)``;
    ``sample(params, key, x1) -> states`` draws states from the model.
    """

    fn: Callable
    sample: Callable
    num_units: int


def _softmax_ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def states_loss(
    apply_fn: Callable,
    variables: dict,
    x,
    *,
    loss: Callable | None = None,
    straight_through: bool = False,
    rng_collection: str = "dropout",
) -> StatesLoss:
    """Turns a flax model built from this module's layers into a function of its binary states.

    The loss of one example with every stochastic unit (activations and
    Bernoulli weights, in the example's own copy) set to given states:
    ``E[L(x1)] = sum_s P(s) L(s)``. With ``straight_through=True`` the
    states carry each layer's ST backward (for `expected_estimate`); otherwise
    they are constants (for `exact_value_and_grad` and `reinforce`).

    Args:
      apply_fn: ``model.apply``, called as ``apply_fn(variables, x, train=True, ...)``.
      variables: ``{"params": ..., **model_state}`` (shapes only are used).
      x: inputs with a leading batch axis (the first example fixes the shapes).
      loss: ``loss(outputs (1, ...), y1) -> (1,) or scalar``; default softmax cross-entropy.
      straight_through: keep the layers' ST backward through the given states.
      rng_collection: the layers' rng stream.

    Returns:
      `StatesLoss` ``(fn, sample, num_units)``.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880 (exact gradients by enumeration).
    """
    loss = loss or _softmax_ce
    model_state = {k: v for k, v in variables.items() if k != "params"}
    x1 = jnp.asarray(x)[:1]

    def sampled(params, key, xb):
        _, sown = apply_fn(
            {"params": params, **model_state},
            xb,
            train=True,
            rngs={rng_collection: key},
            mutable=[_SAMPLES],
        )
        return sown[_SAMPLES]

    shapes = jax.eval_shape(sampled, variables["params"], jax.random.PRNGKey(0), x1)
    leaves, treedef = jax.tree.flatten(shapes)
    sizes = [math.prod(s.shape) for s in leaves]
    num_units = int(sum(sizes))
    col = _STATES_ST if straight_through else _STATES

    def fn(params, states, x_one, y_one):
        parts = jnp.split(states, np.cumsum(sizes)[:-1]) if leaves else []
        shaped = [p.reshape(s.shape) for p, s in zip(parts, leaves, strict=True)]
        tree = jax.tree.unflatten(treedef, shaped)
        out, sown = apply_fn(
            {"params": params, **model_state, col: tree}, x_one[None], train=True, mutable=[_LOGP]
        )
        logp = sum(jax.tree.leaves(sown.get(_LOGP, {})), jnp.zeros(()))
        return jnp.sum(loss(out, jnp.asarray(y_one)[None])), logp

    def sample(params, key, x_one):
        tree = sampled(params, key, x_one[None])
        flat = [jnp.ravel(v) for v in jax.tree.leaves(tree)]
        return jax.lax.stop_gradient(jnp.concatenate(flat) if flat else jnp.zeros((0,)))

    return StatesLoss(fn=fn, sample=sample, num_units=num_units)


def _enumerate(slf: StatesLoss, *, differentiate_probs: bool, max_units: int, chunk_size: int):
    states = all_states(slf.num_units, max_units=max_units)
    n_states = states.shape[0]
    chunk = min(chunk_size, n_states)
    pad = (-n_states) % chunk
    valid = jnp.concatenate([jnp.ones(n_states), jnp.zeros(pad)]).reshape(-1, chunk)
    states = jnp.concatenate([states, jnp.ones((pad, slf.num_units))]).reshape(
        -1, chunk, slf.num_units
    )

    def chunk_value(params, s, v, x1, y1):
        losses, logps = jax.vmap(lambda si: slf.fn(params, si, x1, y1))(s)
        probs = jnp.exp(logps) if differentiate_probs else jax.lax.stop_gradient(jnp.exp(logps))
        return jnp.sum(v * probs * losses)

    chunk_vg = jax.value_and_grad(chunk_value)

    def value_and_grad(params, x, y):
        with jax.default_matmul_precision("highest"):  # ground truth: no TF32 on GPU
            return _scan_examples(params, x, y)

    def _scan_examples(params, x, y):
        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))

        def per_example(acc, xy):
            def body(acc_e, sv):
                val, g = chunk_vg(params, sv[0], sv[1], *xy)
                return jax.tree.map(jnp.add, acc_e, (val, g)), None

            tot, _ = jax.lax.scan(body, zero, (states, valid))
            return jax.tree.map(jnp.add, acc, tot), None

        (val, grads), _ = jax.lax.scan(per_example, zero, (jnp.asarray(x), jnp.asarray(y)))
        n = x.shape[0]
        return val / n, jax.tree.map(lambda g: g / n, grads)

    return jax.jit(value_and_grad)


def exact_value_and_grad(
    slf: StatesLoss, *, max_units: int = MAX_UNITS, chunk_size: int = 4096
) -> Callable:
    """The exact expected loss and its gradient, by enumerating all ``2^n`` states per example.

    ``E(theta) = 1/B sum_b sum_s P_theta(s | x_b) L_theta(s, x_b)``, differentiated
    through the probabilities and the direct dependence of ``L`` on ``theta``.

    Args:
      slf: from `states_loss` (with ``straight_through=False``).
      max_units: refuse (ValueError, with the number of states) above this many units.
      chunk_size: states evaluated at once.

    Returns:
      ``fn(params, x, y) -> (expected loss, grads)``, jitted.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880 (ground truth on the toy).
    """
    return _enumerate(slf, differentiate_probs=True, max_units=max_units, chunk_size=chunk_size)


def expected_estimate(
    slf_st: StatesLoss, *, max_units: int = MAX_UNITS, chunk_size: int = 4096
) -> Callable:
    """The exact mean of an ST estimator: ``sum_s P(s) g_ST(s)``, by enumeration.

    ``g_ST(s)`` is the ST gradient of the loss with the units at ``s`` (the
    layers' own estimators); its mean minus `exact_value_and_grad`'s gradient
    is the estimator's bias, free of Monte Carlo error.

    Args:
      slf_st: from `states_loss(..., straight_through=True)`.
      max_units, chunk_size: as in `exact_value_and_grad`.

    Returns:
      ``fn(params, x, y) -> (expected loss, mean ST gradient)``, jitted.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """
    return _enumerate(slf_st, differentiate_probs=False, max_units=max_units, chunk_size=chunk_size)


def reinforce(slf: StatesLoss, num_samples: int) -> Callable:
    """The unbiased score-function (REINFORCE) estimator with a leave-one-out baseline.

    Per example, with ``M`` samples ``s_m ~ P_theta``:
    ``g = 1/M sum_m [grad L(s_m) + (L(s_m) - b_m) grad log P(s_m)]``,
    ``b_m = mean_{k != m} L(s_k)`` (``b = 0`` when ``M = 1``).

    Args:
      slf: from `states_loss` (``straight_through=False``).
      num_samples: ``M >= 1`` samples per example.

    Returns:
      ``fn(params, key, x, y) -> (mean sampled loss, grads)``, jitted.

    Reference: Williams 1992; Kool et al. 2019 (leave-one-out baseline); the
    unbiased baseline of Shekhovtsov & Yanush 2021, arXiv 2006.06880.
    """
    if not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    m = int(num_samples)

    def surrogate(params, key, x, y):
        def per_example(k, x1, y1):
            s = jax.vmap(lambda kk: slf.sample(params, kk, x1))(jax.random.split(k, m))
            losses, logps = jax.vmap(lambda si: slf.fn(params, si, x1, y1))(s)
            base = (jnp.sum(losses) - losses) / (m - 1) if m > 1 else jnp.zeros_like(losses)
            adv = jax.lax.stop_gradient(losses - base)
            return jnp.mean(losses + adv * logps), jnp.mean(losses)

        keys = jax.random.split(key, x.shape[0])
        sur, losses = jax.vmap(per_example)(keys, x, y)
        return jnp.mean(sur), jnp.mean(losses)

    def fn(params, key, x, y):
        (_, loss), grads = jax.value_and_grad(surrogate, has_aux=True)(params, key, x, y)
        return loss, grads

    return jax.jit(fn)


# ------------------------------------------------- deprecated (moved to estimators)


def gradient_metrics(estimates: PyTree, exact: PyTree) -> dict[str, float]:
    """Deprecated: use `wspace.estimators.gradient_metrics` (same values, more keys)."""
    warnings.warn(_MOVED.format("gradient_metrics"), DeprecationWarning, stacklevel=2)
    return estimators.gradient_metrics(estimates, exact)


def average_estimator(single: Callable) -> Callable:
    """Deprecated: ``fn(key, m)`` averaging ``m`` calls of ``single(key) -> grads``.

    Use `wspace.estimators.average_estimator`, which averages a library-signature estimator.
    """
    warnings.warn(_MOVED.format("average_estimator"), DeprecationWarning, stacklevel=2)

    def fn(key, m):
        return jax.tree.map(lambda v: jnp.mean(v, 0), jax.vmap(single)(jax.random.split(key, m)))

    return fn


def metrics_vs_samples(
    estimate_fn: Callable,
    exact: PyTree,
    key: jax.Array,
    *,
    num_samples: Sequence[int] = (1, 2, 4, 8, 16, 32),
    repeats: int = 32,
) -> dict[str, list]:
    """Deprecated: metrics of ``estimate_fn(key, m)`` against ``exact`` for each ``m``.

    Use `wspace.estimators.metrics_vs_samples` (any library-signature estimator).
    """
    warnings.warn(_MOVED.format("metrics_vs_samples"), DeprecationWarning, stacklevel=2)
    out: dict[str, Any] = {k: [] for k in ("num_samples", "bias", "variance", "rmse", "cosine")}
    for i, m in enumerate(num_samples):
        keys = jax.random.split(jax.random.fold_in(key, i), repeats)
        met = estimators.gradient_metrics(
            jax.jit(jax.vmap(lambda k, m=int(m): estimate_fn(k, m)))(keys), exact
        )
        out["num_samples"].append(int(m))
        for k in ("bias", "variance", "rmse", "cosine"):
            out[k].append(met[k])
        out["norm"] = met["norm"]
    return out


_MOVED = "wspace.straight_through.{0} moved to wspace.estimators.{0} (old name: one more release)"
