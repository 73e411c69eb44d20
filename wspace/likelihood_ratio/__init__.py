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
required. Noise comes from `jax.random` threefry (see `_noise`), ``fold_in``
per perturbed site and independent draw, independent of the key ``loss_fn``
receives (for dropout).

Limitations: parameters outside Dense/Conv layers (BatchNorm scale and bias,
embeddings) get zero gradient; layers inside flax lifted transforms
(``nn.scan``, ``nn.remat``) are not supported; under BatchNorm in train mode
the examples of one copy interact, so per-example weighting is only
approximately unbiased.

Modules: `_ulr` (the ULR estimator, its low-memory mode, the noise control
`noisy_loss`), `_es` (the ES baseline), `_noise` (draws, scores, the PRNG
path), `_copies` (options, baselines and reductions both estimators share).
"""

from wspace.likelihood_ratio._copies import BASELINES, forward_evaluations
from wspace.likelihood_ratio._es import ES, es
from wspace.likelihood_ratio._noise import NOISES, score, unit_noise
from wspace.likelihood_ratio._ulr import (
    LAYER_TYPES,
    ULR,
    noisy_loss,
    perturbed_layers,
    ulr,
)

__all__ = [
    "BASELINES",
    "ES",
    "LAYER_TYPES",
    "NOISES",
    "ULR",
    "es",
    "forward_evaluations",
    "noisy_loss",
    "perturbed_layers",
    "score",
    "ulr",
    "unit_noise",
]
