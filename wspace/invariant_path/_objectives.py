"""Secondary objectives and baselines for functionally invariant paths.

What a path step descends (sparsity: `projection_distance`, `sparsity_loss`;
adversarial robustness: `fgsm`, `pgd`, `adversarial_loss`) and the continual-learning
baseline EWC (`diagonal_fisher`, `ewc_loss`). Each loss has the library signature
``(params, model_state, batch, key) -> (loss, (model_state, metrics))``, so it also
trains with plain optax.

Reference: Raghavan & Thomson 2022, arXiv 2205.00334; Goodfellow et al. 2014,
arXiv 1412.6572; Madry et al. 2017, arXiv 1706.06083; Kirkpatrick et al. 2017,
arXiv 1612.00796.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wspace import pruning
from wspace.invariant_path._checks import check_choice, check_number

PyTree = Any
ATTACKS = ("fgsm", "pgd")


def projection_distance(params: PyTree, sparsity: float, **mask_kwargs: Any) -> jax.Array:
    """Half the squared distance from the weights to their magnitude projection.

    ``0.5 |w - m(w) * w|^2`` with ``m(w)`` = `wspace.pruning.magnitude_masks` at
    ``sparsity`` (held constant: the gradient is ``(1 - m) * w``).

    Args:
      params: the weights.
      sparsity: fraction of prunable weights to remove, in ``[0, 1)``.
      **mask_kwargs: passed to `wspace.pruning.magnitude_masks` (e.g. ``scope``).

    Returns:
      A scalar.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    masks = jax.lax.stop_gradient(pruning.magnitude_masks(params, sparsity, **mask_kwargs))
    pruned = pruning.apply_masks(params, masks)
    diffs = jax.tree.map(lambda w, p: jnp.sum(jnp.square(w - p)), params, pruned)
    return 0.5 * sum(jax.tree.leaves(diffs))  # type: ignore[return-value]  # a sum of arrays


def sparsity_loss(sparsity: float, **mask_kwargs: Any) -> Callable:
    """The sparsity objective as a loss: `projection_distance` in the library signature.

    Args:
      sparsity: target sparsity in ``[0, 1)`` (may be traced, e.g. read from the batch).
      **mask_kwargs: passed to `wspace.pruning.magnitude_masks`.

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, {"distance"}))``
      (the batch is not used).

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    check_number("sparsity", sparsity, lambda v: 0.0 <= v < 1.0, "in [0, 1)")

    def loss(params, model_state, batch, key):
        del batch, key
        dist = projection_distance(params, sparsity, **mask_kwargs)
        return dist, (model_state, {"distance": dist})

    return loss


def fgsm(
    loss_of_x: Callable, x: jax.Array, *, eps: float, clip: tuple[float, float] | None = None
) -> jax.Array:
    """Fast gradient sign method: ``x + eps * sign(d loss / d x)``.

    Args:
      loss_of_x: ``x -> scalar loss``.
      x: clean inputs.
      eps: L-infinity radius.
      clip: optional ``(low, high)`` input range.

    Returns:
      Adversarial inputs (no gradient flows through them).

    Reference: Goodfellow, Shlens & Szegedy 2014, arXiv 1412.6572.
    """
    check_number("eps", eps, lambda v: v >= 0, ">= 0")
    x_adv = x + eps * jnp.sign(jax.grad(loss_of_x)(x))
    if clip is not None:
        x_adv = jnp.clip(x_adv, *clip)
    return jax.lax.stop_gradient(x_adv)


def pgd(
    loss_of_x: Callable,
    x: jax.Array,
    key: jax.Array | None,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    clip: tuple[float, float] | None = None,
) -> jax.Array:
    """Projected gradient descent attack in an L-infinity ball (ascent on the loss).

    ``x_{t+1} = P(x_t + a sign(grad_x loss(x_t)))`` with ``P`` the projection onto
    ``|x' - x|_inf <= eps`` (and ``clip``), from a uniform random start in the ball
    (or from ``x`` when ``key`` is None).

    Args:
      loss_of_x: ``x -> scalar loss``.
      x: clean inputs.
      key: PRNG key for the random start, or None.
      eps: L-infinity radius.
      steps: number of ascent steps (>= 1).
      step_size: ``a`` (default ``2.5 * eps / steps``).
      clip: optional ``(low, high)`` input range.

    Returns:
      Adversarial inputs (no gradient flows through them).

    Reference: Madry et al. 2017, arXiv 1706.06083.
    """
    check_number("eps", eps, lambda v: v >= 0, ">= 0")
    check_number("steps", steps, lambda v: v >= 1 and float(v) == int(v), "an integer >= 1")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = jax.lax.stop_gradient(x)

    def project(z):
        z = jnp.clip(z, x - eps, x + eps)
        return jnp.clip(z, *clip) if clip is not None else z

    start = x if key is None else x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    grad = jax.grad(loss_of_x)

    def body(_, z):
        return project(z + step_size * jnp.sign(grad(z)))

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, project(start)))


def adversarial_loss(
    loss_fn: Callable,
    *,
    eps: float,
    method: str = "pgd",
    steps: int = 10,
    step_size: float | None = None,
    clip: tuple[float, float] | None = None,
) -> Callable:
    """The adversarial-robustness objective: a loss evaluated on attacked inputs.

    ``L_adv(w) = loss_fn(w; x*)`` with ``x* = fgsm/pgd`` attack of ``loss_fn`` at ``w``
    on ``batch["x"]`` (the attack treats ``w`` as a constant).

    Args:
      loss_fn: a loss in the library signature.
      eps: L-infinity radius of the attack.
      method: ``"fgsm"`` or ``"pgd"``.
      steps, step_size: PGD settings (see `pgd`).
      clip: optional ``(low, high)`` input range.

    Returns:
      A loss in the library signature (the PGD random start uses the loss's key).

    Reference: Madry et al. 2017, arXiv 1706.06083; Raghavan & Thomson 2022,
    arXiv 2205.00334.
    """
    check_choice("method", method, ATTACKS)
    check_number("eps", eps, lambda v: v >= 0, ">= 0")

    def loss(params, model_state, batch, key):
        fixed = jax.lax.stop_gradient(params)

        def loss_of_x(x):
            return loss_fn(fixed, model_state, {**batch, "x": x}, key)[0]

        if method == "fgsm":
            x_adv = fgsm(loss_of_x, batch["x"], eps=eps, clip=clip)
        else:
            start_key = None if key is None else jax.random.fold_in(key, 1)
            x_adv = pgd(
                loss_of_x,
                batch["x"],
                start_key,
                eps=eps,
                steps=steps,
                step_size=step_size,
                clip=clip,
            )
        return loss_fn(params, model_state, {**batch, "x": x_adv}, key)

    return loss


# ----------------------------------------------------------------------------- EWC baseline


def diagonal_fisher(
    apply_fn: Callable, params: PyTree, x: jax.Array, *, batch_size: int = 32
) -> PyTree:
    """Exact diagonal of the softmax Fisher, averaged over inputs.

    ``F_i = 1/N sum_n sum_k p_k(x_n) (d log p_k(x_n) / d w_i)^2`` (the expectation over
    the model's own labels is summed exactly over the ``K`` classes).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits (N, K)``.
      params: where the Fisher is taken.
      x: ``(N, ...)`` inputs.
      batch_size: examples per vectorised chunk (memory ``batch_size * K * |w|``).

    Returns:
      A pytree like ``params``.

    Reference: Kirkpatrick et al. 2017, arXiv 1612.00796.
    """
    x = jnp.asarray(x)

    def one(xi):
        def logp(p):
            return jax.nn.log_softmax(apply_fn(p, xi[None])[0])

        jac = jax.jacrev(logp)(params)
        probs = jnp.exp(logp(params))
        return jax.tree.map(lambda j: jnp.tensordot(probs, jnp.square(j), axes=1), jac)

    per_example = jax.lax.map(one, x, batch_size=min(batch_size, x.shape[0]))
    return jax.tree.map(lambda f: jnp.mean(f, axis=0), per_example)


def ewc_loss(
    loss_fn: Callable, anchor_params: PyTree, fisher: PyTree, *, weight: float = 1.0
) -> Callable:
    """Elastic weight consolidation: ``loss_fn + weight/2 * sum_i F_i (w_i - w0_i)^2``.

    Args:
      loss_fn: a loss in the library signature (the new task's).
      anchor_params: ``w0``, the old task's solution.
      fisher: the diagonal Fisher at ``w0`` (`diagonal_fisher`).
      weight: the EWC strength ``lambda``.

    Returns:
      A loss in the library signature; metrics gain ``"ewc"`` (the unweighted quadratic).

    Reference: Kirkpatrick et al. 2017, arXiv 1612.00796.
    """

    def loss(params, model_state, batch, key):
        value, (model_state, metrics) = loss_fn(params, model_state, batch, key)
        quad = jax.tree.map(
            lambda f, w, w0: jnp.sum(f * jnp.square(w - w0)), fisher, params, anchor_params
        )
        penalty = 0.5 * sum(jax.tree.leaves(quad))
        return value + weight * penalty, (model_state, {**metrics, "ewc": penalty})

    return loss
