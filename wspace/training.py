"""Train state, train/eval steps (jit | sharded | pmap), the fit loop, checkpoints.

The two kinds of pure functions meet here (see DESIGN.md):

* A **loss function** has the signature
  ``loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, metrics))``
  where ``model_state`` holds the non-parameter collections (``{"batch_stats": ...}``
  for BatchNorm models, ``{}`` otherwise). `classification_loss` builds one for
  any flax classifier.
* A **gradient estimator** has the shape of `jax.value_and_grad`:
  ``estimator(loss_fn, has_aux=True) -> fn(params, model_state, batch, key)
  -> ((loss, aux), grads)``. Backprop is `jax.value_and_grad` itself; the
  method modules provide others. `make_train_step` takes the estimator as an
  argument, so every method trains through the same step.

Modes: ``jit`` (one device), ``sharded`` (a `jax.sharding.Mesh` over all
devices, batch split along ``data``, params replicated; multi-host after
``jax.distributed.initialize()``), ``pmap`` (the legacy idiom: state
replicated with a leading device axis, gradients ``pmean``-ed). In ``pmap``
mode, BatchNorm normalises with per-device batch statistics (flax's default
without ``axis_name``; the running averages are then ``pmean``-ed) and random
keys are folded with the device index.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace import data as data_lib

MODES = ("jit", "sharded", "pmap")
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


def init_state(model, tx: optax.GradientTransformation, sample_x, key) -> TrainState:
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


def default_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over all devices (of all processes)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    estimator: Callable = jax.value_and_grad,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
) -> Callable:
    """Builds a compiled train step ``step(state, batch, tx_args=None) -> (state, metrics)``.

    One step: split the key, ``(loss, (model_state, metrics)), g =
    estimator(loss_fn, has_aux=True)(params, model_state, batch, key)``,
    ``u, opt_state = tx.update(g, opt_state, params, **tx_args)``, ``params += u``.

    Args:
      loss_fn: the library's loss signature (see module docstring).
      tx: any optax transformation; ``tx_args`` (a dict of arrays, e.g. anchor
        inputs) is passed to ``tx.update`` as extra keyword arguments.
      estimator: gradient estimator with the shape of `jax.value_and_grad`.
      mode: ``jit``, ``sharded`` or ``pmap``. In ``sharded`` mode, place the
        state with `place_state` and batches with `place_batch`; in ``pmap``
        mode the same functions replicate the state and split the batch.
      mesh: the mesh for ``sharded`` mode (default: `default_mesh`).
      donate: donate the input state's buffers to the output.
    """
    _check_mode(mode)

    def step(state: TrainState, batch, tx_args, axis_name=None):
        key, sub = jax.random.split(state.key)
        if axis_name is not None:  # different noise per device, same key stream
            sub = jax.random.fold_in(sub, jax.lax.axis_index(axis_name))
        grad_fn = estimator(loss_fn, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, sub)
        metrics = {**metrics, "loss": jnp.mean(loss)}
        if axis_name is not None:
            grads, model_state, metrics = jax.lax.pmean((grads, model_state, metrics), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **(tx_args or {}))
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            key=key,
        )
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mode == "jit":
        compiled = jax.jit(step, donate_argnums=donate_argnums)
    elif mode == "sharded":
        mesh = mesh or default_mesh()
        repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        compiled = jax.jit(
            step,
            in_shardings=(repl, split, repl),
            out_shardings=(repl, repl),
            donate_argnums=donate_argnums,
        )
    else:
        compiled = jax.pmap(
            lambda s, b, a: step(s, b, a, axis_name="batch"),
            axis_name="batch",
            in_axes=(0, 0, None),
            donate_argnums=donate_argnums,
        )

    def train_step(state, batch, tx_args=None):
        return compiled(state, batch, tx_args)

    return train_step


def place_state(state: TrainState, mode: str, mesh=None) -> TrainState:
    """Puts a host state where a step of ``mode`` expects it (replicated for sharded/pmap)."""
    _check_mode(mode)
    if mode == "sharded":
        return jax.device_put(state, NamedSharding(mesh or default_mesh(), P()))
    if mode == "pmap":
        devices = jax.local_devices()
        sharding = NamedSharding(jax.sharding.Mesh(devices, ("batch",)), P("batch"))
        stacked = jax.tree.map(lambda x: np.broadcast_to(x, (len(devices),) + x.shape), state)
        return jax.device_put(stacked, sharding)
    return state


def unplace_state(state: TrainState, mode: str) -> TrainState:
    """The inverse of `place_state`: one copy of the state (the first device's under pmap)."""
    if mode == "pmap":
        return jax.tree.map(lambda x: x[0], state)
    return state


def place_batch(batch: dict, mode: str, mesh=None) -> dict:
    """Puts this process's batch where a step of ``mode`` expects it.

    ``sharded``: a global array split along ``data`` (each process passes its
    local slice, as `wspace.data.batches` yields with ``process_index``);
    ``pmap``: reshaped to ``(local_devices, B / local_devices, ...)``.
    """
    _check_mode(mode)
    if mode == "sharded":
        sharding = NamedSharding(mesh or default_mesh(), P("data"))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    if mode == "pmap":
        n = jax.local_device_count()
        if len(batch["x"]) % n:
            raise ValueError(f"batch of {len(batch['x'])} does not split over {n} devices")
        return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    return batch


def evaluate(
    apply_fn: Callable, variables: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 1000
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier in eval mode over ``(x, y)``."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        s, c = _eval_batch(
            apply_fn, variables, x[start : start + batch_size], y[start : start + batch_size]
        )
        loss_sum, correct = loss_sum + float(s), correct + int(c)
    return {"loss": loss_sum / len(x), "accuracy": correct / len(x)}


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(apply_fn, variables, x, y):
    logits = apply_fn(variables, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == y)


def fit(
    state: TrainState,
    train_step: Callable,
    dataset: data_lib.Dataset,
    *,
    apply_fn: Callable,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
    mode: str = "jit",
    mesh=None,
    eval_every: int = 100,
    workdir: str | None = None,
    checkpoint_every: int | None = None,
    tx_args: dict | None = None,
    progress: bool = True,
) -> tuple[TrainState, list[dict]]:
    """Trains for ``num_steps`` steps with periodic evaluation and checkpoints.

    With a ``workdir``, each evaluation appends a line to ``metrics.jsonl``
    and an orbax checkpoint is written every ``checkpoint_every`` steps and at
    the end; a rerun with the same workdir resumes from the latest checkpoint
    (same data order, same keys: bit-identical to an uninterrupted run on CPU).
    A non-finite loss stops the run with `FloatingPointError` naming the step;
    checkpoints are only written from finite states.

    Args:
      state: a host `TrainState` (from `init_state`).
      train_step: from `make_train_step` with the same ``mode``/``mesh``.
      dataset: a `wspace.data.Dataset`.
      apply_fn: ``model.apply``, for evaluation.
      num_steps: total steps (counted from step 0, also when resuming).
      batch_size: global batch size.
      seed: data-order seed.
      eval_every: evaluate on train and test sets every this many steps.
      workdir: where metrics and checkpoints go (None: nothing written).
      checkpoint_every: checkpoint period in steps (default: ``eval_every``).
      tx_args: extra arguments for ``tx.update`` (see `make_train_step`).
      progress: show a tqdm progress bar.

    Returns:
      ``(final host state, list of evaluation records)``.
    """
    from tqdm.auto import tqdm

    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    checkpoint_every = checkpoint_every or eval_every
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints")) if workdir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = int(state.step)
    history = _read_metrics(workdir, upto=start)
    stream = data_lib.batches(
        dataset.x_train,
        dataset.y_train,
        batch_size,
        seed=seed,
        epochs=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    stream = itertools.islice(stream, start, None)  # resume: skip the batches already seen
    placed = place_state(jax.tree.map(jnp.copy, state), mode, mesh)  # steps donate their input
    pending: list[tuple[int, jax.Array]] = []  # losses not yet checked for finiteness
    last_good = start
    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="train")
    t0 = time.time()
    try:
        for step in range(start + 1, num_steps + 1):
            placed, metrics = train_step(placed, place_batch(next(stream), mode, mesh), tx_args)
            pending.append((step, metrics["loss"]))
            bar.update(1)
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = ckpt is not None and (step % checkpoint_every == 0 or step == num_steps)
            if is_eval or is_ckpt or len(pending) >= 50:
                _check_finite(pending, last_good, ckpt)
                pending = []
            if is_eval:
                record = {"step": step, "time": round(time.time() - t0, 3)}
                record.update(_evaluate_splits(apply_fn, unplace_state(placed, mode), dataset))
                history.append(record)
                if workdir:
                    _append_jsonl(os.path.join(workdir, "metrics.jsonl"), record)
                bar.set_postfix(test_acc=f"{record['test_accuracy']:.3f}")
            if is_ckpt:
                ckpt.save(step, unplace_state(placed, mode))
                last_good = step
    finally:  # also on errors: the last good checkpoint is complete on disk
        bar.close()
        if ckpt is not None:
            ckpt.close()
    return unplace_state(placed, mode), history


def _evaluate_splits(apply_fn, state: TrainState, dataset: data_lib.Dataset) -> dict:
    """``{train,test}_{loss,accuracy}`` of ``state`` on both splits."""
    record = {}
    for split in ("train", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        for k, v in evaluate(apply_fn, state.variables, x, y).items():
            record[f"{split}_{k}"] = v
    return record


def _check_finite(pending, last_good: int, ckpt) -> None:
    losses = np.asarray(jax.device_get([loss for _, loss in pending]), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses.reshape(len(pending), -1)).all(axis=1))
    if bad.size:
        step, loss = pending[bad[0]][0], losses[bad[0]]
        where = f"the last good checkpoint is step {last_good}" if ckpt else "no checkpoints"
        raise FloatingPointError(
            f"non-finite loss {loss} at step {step}; stopped ({where}). "
            "Lower the learning rate or check the inputs."
        )


class Checkpointer:
    """Orbax checkpoints of a pytree in ``directory``, keeping the newest ``max_to_keep``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: PyTree) -> None:
        self._manager.save(step, args=self._ocp.args.StandardSave(tree))

    def restore(self, like: PyTree, step: int | None = None) -> PyTree:
        """Restores ``step`` (default: latest) with the structure and dtypes of ``like``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename): readers never see half a file."""
    with data_lib.atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)


def _json_default(x):
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def _read_metrics(workdir: str | None, upto: int) -> list[dict]:
    """Records of a resumed run up to its checkpoint; later ones are dropped and redone."""
    path = os.path.join(workdir, "metrics.jsonl") if workdir else None
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["step"] <= upto]
    if len(kept) != len(records):
        with data_lib.atomic_open(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    return kept


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def key_names(keypath) -> tuple[str, ...]:
    """The names along a pytree key path, e.g. ``("BatchNorm_0", "scale")``.

    Works for dict keys, attribute names and sequence indices (what
    `jax.tree_util.tree_flatten_with_path` yields); method modules select
    weights by these names.
    """
    names = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def num_params(params: PyTree) -> int:
    """Total number of scalars in a pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
