"""Evaluation of a classifier: `evaluate`, `correct_predictions`, `classification_eval`.

Sums are taken on the device by jitted functions over padded chunks (one host fetch per
evaluation); every function takes ``seed_axis`` for variables with a leading seed axis.
`classification_eval` is the default ``eval_fn`` of `wspace.training.fit`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace import data as data_lib
from wspace.training._placement import _addressable, _check_mode, default_mesh, place_batch
from wspace.training._state import TrainState


def evaluate(
    apply_fn: Callable,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    seed_axis: bool = False,
) -> dict:
    """Mean cross-entropy and accuracy of a classifier in eval mode over ``(x, y)``.

    ``loss = 1/N sum_n CE(f(x_n), y_n)``, ``accuracy = 1/N sum_n [argmax f(x_n) = y_n]``,
    summed on the device by one jitted function over padded chunks of ``batch_size``
    (padding rows carry weight 0), so the host fetches two scalars at the end. In
    ``sharded`` mode, ``variables`` are the replicated (global) state and each chunk is
    split along ``data`` over the mesh, every process passing its slice (multi-host);
    ``jit`` and ``pmap`` evaluate one host copy on one device. With ``seed_axis``,
    ``variables`` carry a leading seed axis (split over the mesh in ``sharded`` mode,
    as `place_state` puts them) and each value is a list, one per seed.

    Args:
      apply_fn: ``model.apply``.
      variables: ``{"params": ..., **model_state}``.
      x, y: inputs and integer labels (every process passes the whole set).
      batch_size: examples per chunk.
      mode: ``jit``, ``sharded`` or ``pmap`` (as the train step).
      mesh: the mesh for ``sharded`` mode (default: `default_mesh`).
      seed_axis: ``variables`` hold one network per seed.
    """
    _check_mode(mode)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(
            f"evaluate needs a non-empty set with one label per row, got {n} and {len(y)}"
        )
    split = 1
    if mode == "sharded" and not seed_axis:
        mesh = mesh or default_mesh()
        split = math.lcm(mesh.size, jax.process_count())
    chunk = -(-min(batch_size, n) // split) * split
    pad = -n % chunk
    xp = np.concatenate([np.asarray(x), np.zeros((pad, *np.shape(x)[1:]), np.asarray(x).dtype)])
    yp = np.concatenate([np.asarray(y), np.zeros(pad, np.asarray(y).dtype)])
    wp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    local = chunk // jax.process_count()
    lo = jax.process_index() * local
    if seed_axis:
        total = jnp.zeros((len(jax.tree.leaves(variables)[0]), 2), jnp.float32)
    else:
        total = np.zeros(2, np.float32)  # type: ignore[assignment]  # summed into below
    sums = _eval_sums_seeds if seed_axis else _eval_sums
    for start in range(0, n + pad, chunk):
        batch = {"x": xp[start : start + chunk], "y": yp[start : start + chunk]}
        batch["w"] = wp[start : start + chunk]
        if mode == "sharded" and not seed_axis:
            batch = place_batch({k: a[lo : lo + local] for k, a in batch.items()}, mode, mesh)
        total = sums(apply_fn, variables, batch, total)
    sums_host = np.asarray(jax.device_get(_addressable(total)), np.float64)
    if seed_axis:
        return {"loss": list(sums_host[:, 0] / n), "accuracy": list(sums_host[:, 1] / n)}
    return {"loss": float(sums_host[0]) / n, "accuracy": float(sums_host[1]) / n}


def _eval_sums_one(apply_fn, variables, batch, total):
    logits = apply_fn(variables, batch["x"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return total + jnp.stack([jnp.sum(losses * batch["w"]), jnp.sum(hits * batch["w"])])


_eval_sums = jax.jit(_eval_sums_one, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums_seeds(apply_fn, variables, batch, total):
    one = functools.partial(_eval_sums_one, apply_fn)
    return jax.vmap(one, in_axes=(0, None, 0))(variables, batch, total)


def correct_predictions(
    apply_fn: Callable,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    seed_axis: bool = False,
) -> np.ndarray:
    """Whether a classifier (eval mode) gets each example right: ``argmax f(x_n) == y_n``.

    Returns a bool array of shape ``(N,)``, or ``(S, N)`` for ``variables`` with a leading
    seed axis: what paired comparisons over a test set need (examples two arms disagree
    on; intervals over test-set sampling). ``evaluate``'s accuracy is its mean.
    """
    if len(x) == 0 or len(y) != len(x):
        raise ValueError(f"need a non-empty set with one label per row, got {len(x)}, {len(y)}")
    predict = _predictions_seeds if seed_axis else _predictions
    chunks = [
        np.asarray(
            jax.device_get(_addressable(predict(apply_fn, variables, x[i : i + batch_size])))
        )
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(chunks, axis=-1) == np.asarray(y)


@functools.partial(jax.jit, static_argnums=0)
def _predictions(apply_fn, variables, x):
    return jnp.argmax(apply_fn(variables, x, train=False), -1)


@functools.partial(jax.jit, static_argnums=0)
def _predictions_seeds(apply_fn, variables, x):
    return jax.vmap(lambda v: jnp.argmax(apply_fn(v, x, train=False), -1))(variables)


def classification_eval(
    apply_fn: Callable,
    dataset: data_lib.Dataset,
    *,
    train_eval_examples: int | None = 1000,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    seed_axis: bool = False,
) -> Callable[[TrainState], dict]:
    """The default ``eval_fn`` of `fit`: `evaluate` on the test split and part of train.

    Returns ``eval_fn(state) -> {"train_loss", "train_accuracy", "test_loss",
    "test_accuracy"}`` over the first ``train_eval_examples`` training examples (all of
    them for None; no ``train_*`` entries for 0) and the whole test split; with
    ``seed_axis`` each value is a list, one per seed.
    """
    n_train = len(dataset.x_train) if train_eval_examples is None else train_eval_examples
    n_train = min(n_train, len(dataset.x_train))
    splits = [("test", dataset.x_test, dataset.y_test)]
    if n_train > 0:
        splits.insert(0, ("train", dataset.x_train[:n_train], dataset.y_train[:n_train]))

    def eval_fn(state):
        record = {}
        for split, x, y in splits:
            values = evaluate(
                apply_fn, state.variables, x, y, mode=mode, mesh=mesh, seed_axis=seed_axis
            )
            record.update({f"{split}_{k}": v for k, v in values.items()})
        return record

    return eval_fn
