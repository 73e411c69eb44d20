"""Ground truth for binary networks: exact expectations by enumerating all states.

`states_loss` turns a model built from the binary layers into a function of its
binary states; `exact_value_and_grad` enumerates all ``2^n`` states of one example,
`expected_estimate` gives the exact mean of an ST estimator, `reinforce` the
unbiased score-function estimator. Enumeration computes at ``Precision.HIGHEST``.

Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace.straight_through._layers import LOGP, SAMPLES, STATES, STATES_ST

MAX_UNITS = 20


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
    x: jax.Array,
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
            mutable=[SAMPLES],
        )
        return sown[SAMPLES]

    shapes = jax.eval_shape(sampled, variables["params"], jax.random.PRNGKey(0), x1)
    leaves, treedef = jax.tree.flatten(shapes)
    sizes = [math.prod(s.shape) for s in leaves]
    num_units = int(sum(sizes))
    col = STATES_ST if straight_through else STATES

    def fn(params, states, x_one, y_one):
        parts = jnp.split(states, np.cumsum(sizes)[:-1]) if leaves else []
        shaped = [p.reshape(s.shape) for p, s in zip(parts, leaves, strict=True)]
        tree = jax.tree.unflatten(treedef, shaped)
        out, sown = apply_fn(
            {"params": params, **model_state, col: tree}, x_one[None], train=True, mutable=[LOGP]
        )
        logp = sum(jax.tree.leaves(sown.get(LOGP, {})), jnp.zeros(()))
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


def reinforce_estimator(slf: StatesLoss, num_samples: int) -> Callable:
    """`reinforce` in the library's estimator signature (that of `jax.value_and_grad`).

    ``estimator(loss_fn, has_aux=True) -> fn(params, model_state, batch, key)`` returning
    ``((loss, (model_state, {})), grads)``, for `wspace.training.make_train_step` and
    `wspace.estimators`. ``loss_fn`` is ignored: REINFORCE needs the network as a
    function of its states, ``slf``; ``batch`` holds ``"x"`` and ``"y"``.
    """
    fn = reinforce(slf, num_samples)

    def estimator(loss_fn, has_aux=True):
        del loss_fn

        def call(params, model_state, batch, key):
            loss, grads = fn(params, key, batch["x"], batch["y"])
            return ((loss, (model_state, {})) if has_aux else loss), grads

        return call

    return estimator
