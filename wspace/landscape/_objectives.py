"""`classification_objective`: the closure ``f(params) -> scalar`` of a flax classifier."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from wspace.landscape._util import METRICS


def classification_objective(
    apply_fn: Callable,
    variables_without_params: dict | None,
    x: ArrayLike,
    y: ArrayLike,
    *,
    metric: str = "loss",
    batch_size: int | None = None,
) -> Callable:
    """Builds ``f(params)``: a classifier's mean cross-entropy or error rate, in eval mode.

    ``loss(θ) = -1/N Σ_n log softmax(h_θ(x_n))[y_n]``, ``error(θ) = 1/N Σ_n
    [argmax h_θ(x_n) ≠ y_n]``, with ``h_θ = apply_fn({"params": θ, **variables}, ·,
    train=False)``: BatchNorm uses its running statistics, so ``f`` is a fixed,
    twice-differentiable (for ``"loss"``) function of the parameters.

    Args:
      apply_fn: ``model.apply``, called as ``apply_fn(variables, x, train=False)``.
      variables_without_params: the other flax collections (``{"batch_stats": ...}``,
        i.e. a `TrainState`'s ``model_state``), or ``{}``/``None``.
      x, y: inputs and integer labels, evaluated as one full batch.
      metric: ``"loss"`` (mean cross-entropy), ``"error"`` (error rate, for paths and
        barriers; not differentiable) or ``"all"`` (``{"loss": ..., "error": ...}``).
      batch_size: evaluate in chunks of this size with `jax.lax.map` (saves memory on
        large sets; the last chunk is padded and masked). ``None``: one batch.

    Returns:
      ``f(params) -> scalar`` (a dict of two scalars for ``metric="all"``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; use one of {METRICS}")
    other = dict(variables_without_params or {})
    if "params" in other:
        raise ValueError(
            "variables_without_params contains 'params'; pass only the other collections "
            "(e.g. {'batch_stats': ...}) and give params to f"
        )
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"need as many labels as inputs and at least one; got {n} and {len(y)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive int or None")

    def sums(params, xb, yb, wb):
        logits = apply_fn({"params": params, **other}, xb, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        wrong = (jnp.argmax(logits, -1) != yb).astype(losses.dtype)
        return jnp.sum(wb * losses), jnp.sum(wb * wrong)

    if batch_size is None or batch_size >= n:
        chunks = None
    else:
        num = -(-n // batch_size)
        pad = num * batch_size - n
        xp = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
        yp = jnp.concatenate([y, jnp.repeat(y[:1], pad, axis=0)])
        wp = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)])
        chunks = (
            xp.reshape((num, batch_size) + x.shape[1:]),
            yp.reshape((num, batch_size) + y.shape[1:]),
            wp.reshape(num, batch_size),
        )

    def f(params):
        if chunks is None:
            loss_sum, err_sum = sums(params, x, y, jnp.ones(n))
        else:
            per = jax.lax.map(lambda c: sums(params, *c), chunks)
            loss_sum, err_sum = jnp.sum(per[0]), jnp.sum(per[1])
        out = {"loss": loss_sum / n, "error": err_sum / n}
        return out if metric == "all" else out[metric]

    return f
