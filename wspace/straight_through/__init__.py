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
  probable state (``sign(a)``, ``sign(eta)``), no rng needed; `sampled_predictions`
  predicts with the mean of S stochastic passes instead.
* `mirror_descent`: the optax update of latent weights (``optax.sgd``, plus
  `clip_latents` for the clipped-latent variant); `latent_labels` for
  ``optax.multi_transform``.
* Ground truth and baselines: `states_loss` turns a model built from these
  layers into a function of its binary states, `exact_value_and_grad`
  enumerates all ``2^n`` states of one example, `expected_estimate` gives the
  exact mean of an ST estimator, `reinforce` the unbiased score-function
  estimator (`reinforce_estimator`: the same in the library's estimator signature).
  Enumeration computes at ``Precision.HIGHEST``. Judging an estimator against the
  exact gradient (bias, variance, cosine vs samples) is `wspace.estimators`.

Layout: `_estimators` (noise and the ST estimator family), `_layers` (flax layers),
`_mirror_descent` (the optimizer of latent weights), `_enumeration` (exact
expectations); every public name is re-exported here (``ws.straight_through.X``).
"""

from wspace.straight_through._enumeration import (
    MAX_UNITS,
    StatesLoss,
    all_states,
    exact_value_and_grad,
    expected_estimate,
    reinforce,
    reinforce_estimator,
    states_loss,
)
from wspace.straight_through._estimators import (
    ESTIMATORS,
    NOISES,
    bernoulli_weights,
    noise_cdf,
    noise_pdf,
    sign_ste,
    stochastic_sign,
    straight_through,
)
from wspace.straight_through._layers import (
    LAYER_ESTIMATORS,
    BinaryConv,
    BinaryDense,
    BinaryMLP,
    sampled_predictions,
)
from wspace.straight_through._mirror_descent import (
    clip_latents,
    latent_labels,
    mirror_descent,
)

__all__ = [
    "BinaryConv",
    "BinaryDense",
    "BinaryMLP",
    "ESTIMATORS",
    "LAYER_ESTIMATORS",
    "MAX_UNITS",
    "NOISES",
    "StatesLoss",
    "all_states",
    "bernoulli_weights",
    "clip_latents",
    "exact_value_and_grad",
    "expected_estimate",
    "latent_labels",
    "mirror_descent",
    "noise_cdf",
    "noise_pdf",
    "reinforce",
    "reinforce_estimator",
    "sampled_predictions",
    "sign_ste",
    "states_loss",
    "stochastic_sign",
    "straight_through",
]
