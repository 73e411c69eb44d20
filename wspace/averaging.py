"""Weight averaging (SWA) and BatchNorm recalibration, for any method and any model.

Stochastic weight averaging keeps the running mean of the iterates ``theta_t``
of a run, ``mean <- mean + (theta_t - mean) / n``, inside the optimizer state
(`swa`, read with `swa_params`). An average of weights is a new network whose
BatchNorm running statistics belong to none of the averaged iterates, so they
are re-estimated by a pass over training data (`recompute_batch_stats`).

Infrastructure: this module imports no method module; `wspace.late_phase`
uses it for late-phase + SWA runs (the mean then carries the member axes).

Reference: Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging weights
leads to wider optima and better generalization", UAI 2018, arXiv 1803.05407.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class SWAState(NamedTuple):
    """State of `swa`: updates seen (``count``), iterates averaged (``n``), their ``mean``."""

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    n: jax.Array
    mean: PyTree


def swa(start: int = 0, every: int = 1) -> optax.GradientTransformationExtraArgs:
    """Stochastic weight averaging as an optax transformation that keeps the average in its state.

    Passes updates through unchanged and averages the new iterates
    ``theta_t = params + updates`` for ``t >= start`` with ``(t - start) %
    every == 0`` (t counts updates from 1): ``mean <- mean + (theta_t -
    mean) / n``. Put it last in an ``optax.chain``; read the average with
    `swa_params`. Before the first averaged step the mean is the initial
    params. Works on any params tree (late-phase params too: the mean then has
    their member axes).

    Args:
      start: first step to average (numeric; may be injected).
      every: averaging period in steps (numeric; may be injected).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `SWAState`; needs
      ``params`` in ``update``.

    Reference: Izmailov et al. 2018, arXiv 1803.05407.
    """

    def init_fn(params):
        return SWAState(
            count=jnp.zeros((), jnp.int32),
            n=jnp.zeros((), jnp.int32),
            mean=jax.tree.map(lambda x: jnp.array(x, copy=True), params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("swa needs params: call tx.update(updates, state, params)")
        count = optax.safe_int32_increment(state.count)
        take = (count >= start) & (jnp.mod(count - start, every) == 0)
        n = state.n + take.astype(jnp.int32)  # n <= count: cannot overflow first
        weight = jnp.where(take, 1.0 / jnp.maximum(n, 1), 0.0)
        new_params = optax.apply_updates(params, updates)
        mean = jax.tree.map(
            lambda m, p: (m + weight.astype(m.dtype) * (p - m)).astype(m.dtype),
            state.mean,
            new_params,
        )
        return updates, SWAState(count=count, n=n, mean=mean)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_params(opt_state: PyTree) -> PyTree:
    """The running average kept by the (single) `swa` inside an optimizer state.

    Raises:
      ValueError: when the state holds no `SWAState` or more than one.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SWAState))
        if isinstance(s, SWAState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SWAState in the optimizer state, found {len(found)}"
        )
    return found[0].mean


def recompute_batch_stats(
    loss_fn: Callable,
    params: PyTree,
    model_state: PyTree,
    batches: Iterable[dict],
    *,
    key: jax.Array | None = None,
) -> PyTree:
    """Re-estimates BatchNorm running statistics for given params (needed after SWA).

    Runs ``loss_fn`` (train mode: BatchNorm updates its running averages with
    its own momentum m) over ``batches`` and returns the final ``model_state``;
    the old statistics keep weight ``m ** len(batches)``. Works with any loss
    in the library's signature ``loss_fn(params, model_state, batch, key) ->
    (loss, (model_state, metrics))``, e.g. a late-phase loss (per-member
    statistics).

    Args:
      loss_fn: the training loss (BatchNorm in train mode).
      params: the (averaged) params.
      model_state: the model state to start from (``{}``: returned unchanged).
      batches: training batches (dicts).
      key: PRNG key for the loss (default ``PRNGKey(0)``), folded with the batch index.

    Returns:
      The model state after the passes.

    Reference: Izmailov et al. 2018, arXiv 1803.05407 (``bn_update``).
    """
    if not jax.tree.leaves(model_state):
        return model_state
    key = jax.random.PRNGKey(0) if key is None else key
    step = jax.jit(lambda p, s, b, k: loss_fn(p, s, b, k)[1][0])
    for i, batch in enumerate(batches):
        model_state = step(params, model_state, batch, jax.random.fold_in(key, i))
    return model_state
