"""The train state and what builds it: `TrainState`, `init_state`, `init_states`, losses.

`init_states` stacks one state per seed on a leading seed axis (`seed_slice` takes one
back); `classification_loss` is the library's loss signature for any flax classifier;
`check_learning_rate` and `num_params` are the small checks and counts training code
shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: ``step``, ``params``, ``model_state``, ``opt_state``, ``key``.

    ``model_state`` is the dict of non-parameter flax collections (BatchNorm's
    ``batch_stats``); ``key`` is a raw ``uint32[2]`` PRNG key, split every step.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    key: jax.Array

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, ready for ``model.apply``."""
        return {"params": self.params, **self.model_state}


def init_state(
    model: flax.linen.Module, tx: optax.GradientTransformation, sample_x: ArrayLike, key: jax.Array
) -> TrainState:
    """Initialises a model's variables and the optimizer state.

    Args:
      model: a flax.linen module called as ``model(x, train=...)``.
      tx: an optax transformation.
      sample_x: one batch (or one example with a leading axis) of inputs.
      key: PRNG key; split into the init key and the state's running key.
    """
    init_key, run_key = jax.random.split(key)
    # jit: one compile instead of dozens of small eager ones (same values on CPU)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, jnp.asarray(sample_x))
    params = variables["params"]
    model_state = {k: v for k, v in dict(variables).items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=jax.jit(tx.init)(params),
        key=run_key,
    )


def init_states(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    sample_x: ArrayLike,
    seeds: Sequence[int],
) -> TrainState:
    """`init_state` for every seed at once: a `TrainState` with a leading seed axis.

    Slice ``i`` is ``init_state(model, tx, sample_x, jax.random.PRNGKey(seeds[i]))``
    (its own initialisation and PRNG stream), ready for a step built with ``seed_axis``.
    """
    seeds = _check_seeds(seeds)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    return jax.vmap(lambda k: init_state(model, tx, sample_x, k))(keys)


def seed_slice(tree: PyTree, index: int) -> PyTree:
    """Slice ``index`` of a tree with a leading seed axis (a state, params, metrics)."""
    return jax.tree.map(lambda x: x[index], tree)


def classification_loss(apply_fn: Callable, *, per_example: bool = False) -> Callable:
    """Softmax cross-entropy loss of a flax classifier, in the library's loss signature.

    ``L = -1/B sum_b log softmax(f(x_b))[y_b]``, with the model in train mode
    (BatchNorm uses batch statistics and updates its running averages).

    Args:
      apply_fn: ``model.apply``.
      per_example: return the (B,) vector of losses instead of the mean
        (for estimators that weight each example's loss, e.g. likelihood ratios).

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, metrics))``
      with ``metrics = {"loss", "accuracy"}``.
    """

    def loss_fn(params, model_state, batch, key):
        variables = {"params": params, **model_state}
        rngs = {"dropout": key} if key is not None else None
        if model_state:
            logits, new_state = apply_fn(
                variables, batch["x"], train=True, mutable=list(model_state), rngs=rngs
            )
        else:
            logits, new_state = apply_fn(variables, batch["x"], train=True, rngs=rngs), {}
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        metrics = {
            "loss": jnp.mean(losses),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
        }
        return (losses if per_example else jnp.mean(losses)), (dict(new_state), metrics)

    return loss_fn


def check_learning_rate(learning_rate: optax.ScalarOrSchedule, name: str = "learning_rate") -> None:
    """Raises ValueError for a numeric learning rate that is not finite and > 0.

    Where wspace builds an optimizer: a negative rate ascends the loss (it trained to
    7e17 and exited 0). Schedules (callables) are the caller's to check.
    """
    if callable(learning_rate):
        return
    try:
        value = float(learning_rate)  # Python, NumPy and concrete JAX scalars
    except jax.errors.ConcretizationTypeError:
        return  # traced (e.g. optax.inject_hyperparams under jit)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0 (or a schedule), got {learning_rate!r}")


def num_params(params: PyTree) -> int:
    """Total number of scalars in a pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _check_seeds(seeds) -> list[int]:
    """A non-empty sequence of distinct ints, as a list; ValueError otherwise."""
    if isinstance(seeds, str) or not isinstance(seeds, Sequence | np.ndarray):
        raise ValueError(f"seeds must be a sequence of ints, got {seeds!r}")
    seeds = list(seeds)
    if not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints, got {seeds!r}")
    return [int(s) for s in seeds]
