"""Train state, train/eval steps (jit | sharded | pmap) and the generic `fit` loop.

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

`fit` drives any train step over a `wspace.data.Dataset` or any iterable of batches,
evaluates with any ``eval_fn(state) -> dict`` (classification by default), writes
metrics through `wspace.io` writers, and checkpoints, verifies and resumes through
`wspace.io.Checkpointer` (all file handling lives in `wspace.io`).

Many hosts: start the same script once per host and call
``jax.distributed.initialize()`` before anything else (it reads Slurm's or a TPU pod's
environment; elsewhere pass ``coordinator_address``, ``num_processes``, ``process_id``),
then use ``mode="sharded"``: `fit` gives each process its slice of every global batch,
only process 0 writes the files written once, and orbax coordinates the checkpoints.
tests/test_multihost.py runs two such processes on one machine (gloo CPU collectives).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace import data as data_lib
from wspace import io

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

    return compile_step(step, mode, mesh, donate=donate)


def compile_step(step: Callable, mode: str, mesh=None, *, donate: bool = True) -> Callable:
    """Compiles ``step(state, batch, tx_args, axis_name=None) -> (state, metrics)`` for ``mode``.

    ``jit``: one device; ``sharded``: state and ``tx_args`` replicated, batch split
    along ``data`` of ``mesh`` (default `default_mesh`); ``pmap``: over local
    devices with ``axis_name="batch"`` (``step`` averages what it must). Method
    modules with their own step body (e.g. `wspace.late_phase`) compile it here.

    Returns:
      ``train_step(state, batch, tx_args=None) -> (state, metrics)``.
    """
    _check_mode(mode)
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
    apply_fn: Callable,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    mode: str = "jit",
    mesh=None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier in eval mode over ``(x, y)``.

    ``loss = 1/N sum_n CE(f(x_n), y_n)``, ``accuracy = 1/N sum_n [argmax f(x_n) = y_n]``,
    summed on the device by one jitted function over padded chunks of ``batch_size``
    (padding rows carry weight 0), so the host fetches two scalars at the end. In
    ``sharded`` mode, ``variables`` are the replicated (global) state and each chunk is
    split along ``data`` over the mesh, every process passing its slice (multi-host);
    ``jit`` and ``pmap`` evaluate one host copy on one device.

    Args:
      apply_fn: ``model.apply``.
      variables: ``{"params": ..., **model_state}``.
      x, y: inputs and integer labels (every process passes the whole set).
      batch_size: examples per chunk.
      mode: ``jit``, ``sharded`` or ``pmap`` (as the train step).
      mesh: the mesh for ``sharded`` mode (default: `default_mesh`).
    """
    _check_mode(mode)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(
            f"evaluate needs a non-empty set with one label per row, got {n} and {len(y)}"
        )
    split = 1
    if mode == "sharded":
        mesh = mesh or default_mesh()
        split = math.lcm(mesh.size, jax.process_count())
    chunk = -(-min(batch_size, n) // split) * split
    pad = -n % chunk
    xp = np.concatenate([np.asarray(x), np.zeros((pad, *np.shape(x)[1:]), np.asarray(x).dtype)])
    yp = np.concatenate([np.asarray(y), np.zeros(pad, np.asarray(y).dtype)])
    wp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    local = chunk // jax.process_count()
    lo = jax.process_index() * local
    total = np.zeros(2, np.float32)
    for start in range(0, n + pad, chunk):
        batch = {"x": xp[start : start + chunk], "y": yp[start : start + chunk]}
        batch["w"] = wp[start : start + chunk]
        if mode == "sharded":
            batch = place_batch({k: a[lo : lo + local] for k, a in batch.items()}, mode, mesh)
        total = _eval_sums(apply_fn, variables, batch, total)
    loss_sum, correct = np.asarray(jax.device_get(total), np.float64)
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(apply_fn, variables, batch, total):
    logits = apply_fn(variables, batch["x"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return total + jnp.stack([jnp.sum(losses * batch["w"]), jnp.sum(hits * batch["w"])])


def classification_eval(
    apply_fn: Callable,
    dataset: data_lib.Dataset,
    *,
    train_eval_examples: int | None = 1000,
    mode: str = "jit",
    mesh=None,
) -> Callable[[TrainState], dict[str, float]]:
    """The default ``eval_fn`` of `fit`: `evaluate` on the test split and part of train.

    Returns ``eval_fn(state) -> {"train_loss", "train_accuracy", "test_loss",
    "test_accuracy"}`` over the first ``train_eval_examples`` training examples (all of
    them for None; no ``train_*`` entries for 0) and the whole test split.
    """
    n_train = len(dataset.x_train) if train_eval_examples is None else train_eval_examples
    n_train = min(n_train, len(dataset.x_train))
    splits = [("test", dataset.x_test, dataset.y_test)]
    if n_train > 0:
        splits.insert(0, ("train", dataset.x_train[:n_train], dataset.y_train[:n_train]))

    def eval_fn(state):
        record = {}
        for split, x, y in splits:
            for k, v in evaluate(apply_fn, state.variables, x, y, mode=mode, mesh=mesh).items():
                record[f"{split}_{k}"] = v
        return record

    return eval_fn


def fit(
    state: TrainState,
    train_step: Callable,
    data: data_lib.Dataset | Iterable[dict],
    *,
    num_steps: int,
    batch_size: int | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    apply_fn: Callable | None = None,
    eval_every: int = 100,
    seed: int = 0,
    mode: str = "jit",
    mesh=None,
    workdir: str | None = None,
    checkpoint_every: int | None = None,
    tx_args: dict | Callable[[dict], dict] | None = None,
    writer: io.MetricWriter | None = None,
    train_eval_examples: int | None = 1000,
    progress: bool = True,
) -> tuple[TrainState, list[dict]]:
    """Trains from ``state.step`` to ``num_steps`` with periodic evaluation and checkpoints.

    Every ``eval_every`` steps (and at the end) a record ``{"step", "time", "batch_<m>"
    (mean of each train-step metric since the last record), **eval_fn(state)}`` is added
    to the history and sent to the metric writers.

    With a ``workdir``: the workdir is locked (`wspace.io.workdir_lock`); its ``fit.json``
    holds the run's identity (num_steps, seed, batch_size, parameter shapes/dtypes) and a
    rerun with another identity is refused with the difference; ``metrics.jsonl`` gets
    every record; a verified orbax checkpoint (`wspace.io.Checkpointer`) is written every
    ``checkpoint_every`` steps and at the end, only of a state whose every parameter,
    model-state and optimizer leaf is finite. A rerun resumes from the newest valid
    checkpoint (a damaged one falls back with a warning), truncates ``metrics.jsonl`` to
    it and skips the batches already consumed: bit-identical to an uninterrupted run on
    CPU. A non-finite loss or state stops the run with `FloatingPointError` naming the
    step and the last checkpoint verified finite. In a multi-process run every process
    calls `fit`; only process 0 locks, writes ``fit.json``/``metrics.jsonl`` and calls
    ``writer`` (orbax coordinates the checkpoint writes itself).

    Args:
      state: a host `TrainState` (from `init_state`).
      train_step: from `make_train_step` with the same ``mode``/``mesh``.
      data: a `wspace.data.Dataset` (batches of ``batch_size`` drawn by
        `wspace.data.batches` with ``seed``, this process's slice in multi-host runs), or
        any iterable of batch dicts (this process's slice); resuming at step k skips the
        first k batches.
      num_steps: total steps (counted from step 0, also when resuming).
      batch_size: global batch size (needed for a Dataset).
      eval_fn: ``eval_fn(state) -> dict[str, float]`` on the unplaced state; default for a
        Dataset: `classification_eval` (needs ``apply_fn``); none for other data.
      apply_fn: ``model.apply``, for the default evaluation.
      eval_every: record period in steps.
      seed: data-order seed.
      mode, mesh: as `make_train_step`.
      workdir: where the lock, identity, metrics and checkpoints go (None: nothing written).
      checkpoint_every: checkpoint period in steps (default: ``eval_every``).
      tx_args: extra arguments for ``tx.update``: a dict, or ``tx_args(batch) -> dict``
        called with each host batch (in multi-host runs it must return the same values on
        every process).
      writer: a metric writer (`wspace.io`) that also gets every record (process 0 only;
        steps redone after a resume are written to it again).
      train_eval_examples: training examples the default evaluation uses (None: all).
      progress: show a tqdm progress bar.

    Returns:
      ``(final state, list of records)``; on resume the records of the earlier run(s)
      are read back from ``metrics.jsonl``.
    """
    _validate_fit(
        state, data, num_steps, batch_size, eval_every, checkpoint_every, train_eval_examples
    )
    _check_callables(train_step=train_step, eval_fn=eval_fn, apply_fn=apply_fn)
    if not (tx_args is None or isinstance(tx_args, dict) or callable(tx_args)):
        raise ValueError(f"tx_args must be a dict, a callable(batch) or None, got {tx_args!r}")
    if writer is not None and not callable(getattr(writer, "write_scalars", None)):
        raise ValueError(f"writer must have write_scalars(step, scalars), got {writer!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    is_dataset = isinstance(data, data_lib.Dataset)
    if eval_fn is None and is_dataset:
        if apply_fn is None:
            raise ValueError("fit on a Dataset needs apply_fn (default evaluation) or eval_fn")
        eval_fn = classification_eval(
            apply_fn, data, train_eval_examples=train_eval_examples, mode=mode, mesh=mesh
        )
    primary = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        if workdir and primary:
            stack.enter_context(io.workdir_lock(workdir))
        ckpt = last_good = None
        sums = {}  # running sums of the step metrics since the last record (saved with it)
        if workdir:
            _check_identity(workdir, state, num_steps, seed, batch_size, primary)
            ckpt = io.Checkpointer(os.path.join(workdir, "checkpoints"))
            stack.callback(ckpt.close)
            if ckpt.all_steps():
                sharding = NamedSharding(mesh, P()) if mode == "sharded" else None
                last_good, state, meta = ckpt.restore_with_step(state, sharding=sharding)
                sums = {k: tuple(v) for k, v in (meta or {}).get("window", {}).items()}
        start = int(state.step)
        history = _resume_metrics(workdir, start, primary)
        writers = [io.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))] if workdir else []
        writers = writers + ([writer] if writer is not None else []) if primary else []
        stack.callback(lambda: [w.close() if w is not writer else w.flush() for w in writers])
        if is_dataset:
            stream = data_lib.batches(
                data.x_train,
                data.y_train,
                batch_size,
                seed=seed,
                epochs=None,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        else:
            stream = iter(data)
        stream = itertools.islice(stream, start, None)  # resume: skip the batches already seen
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, disable=not (progress and primary), desc="train")
        stack.callback(bar.close)
        placed = place_state(jax.tree.map(jnp.copy, state), mode, mesh)  # steps donate inputs
        pending = []  # step metrics not yet checked for finiteness
        t0 = time.time()
        for step in range(start + 1, num_steps + 1):
            batch = next(stream, None)
            if batch is None:
                raise ValueError(f"data ran out after {step - 1} batches; num_steps={num_steps}")
            args = tx_args(batch) if callable(tx_args) else tx_args
            placed, metrics = train_step(placed, place_batch(batch, mode, mesh), args)
            pending.append((step, metrics))
            bar.update(1)
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = ckpt is not None and (step % (checkpoint_every or eval_every) == 0)
            is_ckpt = is_ckpt or (ckpt is not None and step == num_steps)
            if is_eval or is_ckpt or len(pending) >= 50:
                _check_finite(pending, sums, last_good, ckpt)
                pending = []
            if is_ckpt and not bool(_all_finite(placed)):
                raise FloatingPointError(
                    f"non-finite parameters or optimizer state after step {step}; not "
                    f"checkpointed, stopped ({_last_good_text(last_good, ckpt)}). "
                    "Lower the learning rate or check the inputs."
                )
            if is_eval:
                record = {"step": step, "time": round(time.time() - t0, 3)}
                record.update({f"batch_{k}": s / c for k, (s, c) in sums.items()})
                sums = {}
                if eval_fn is not None:
                    evals = eval_fn(unplace_state(placed, mode))
                    record.update({k: _to_float(v) for k, v in evals.items()})
                history.append(record)
                for w in writers:
                    w.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
                if "test_accuracy" in record:
                    bar.set_postfix(test_acc=f"{record['test_accuracy']:.3f}")
            if is_ckpt:
                ckpt.save(step, unplace_state(placed, mode), meta={"window": sums})
                last_good = step
    return unplace_state(placed, mode), history


def _validate_fit(state, data, num_steps, batch_size, eval_every, ckpt_every, train_eval) -> None:
    """Bad arguments of `fit` -> ValueError before any work or file write."""

    def is_int(v):
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    for name, value, optional in (
        ("num_steps", num_steps, False),
        ("eval_every", eval_every, False),
        ("checkpoint_every", ckpt_every, True),
        ("batch_size", batch_size, True),
    ):
        if not (optional and value is None) and not (is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if train_eval is not None and not (is_int(train_eval) and train_eval >= 0):
        raise ValueError(f"train_eval_examples must be an int >= 0 or None, got {train_eval!r}")
    if isinstance(data, data_lib.Dataset):
        if batch_size is None:
            raise ValueError("fit on a Dataset needs batch_size")
    elif not isinstance(data, Iterable):
        raise ValueError(
            f"data must be a wspace.data.Dataset or an iterable of batches, got {type(data)}"
        )
    if int(state.step) > num_steps:
        raise ValueError(f"state is at step {int(state.step)}, beyond num_steps={num_steps}")


def _check_callables(**fns) -> None:
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
    if fns["train_step"] is None:
        raise ValueError("train_step must be callable (from make_train_step), got None")


def _check_identity(workdir, state, num_steps, seed, batch_size, primary) -> None:
    """Stores the run's identity in ``workdir/fit.json``, or refuses a different one.

    A workdir without checkpoints holds nothing to resume (e.g. a run that failed at its
    first step): its identity is replaced with a warning, so a fixed rerun just works.
    """
    path = os.path.join(workdir, "fit.json")
    identity = {
        "num_steps": int(num_steps),
        "seed": int(seed),
        "batch_size": None if batch_size is None else int(batch_size),
        "params": io.tree_signature(state.params),
    }
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resumable = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if os.path.exists(path):
        try:
            stored = io.read_json(path, recover=f"delete {workdir} to start over")
        except ValueError:
            if resumable:
                raise
            stored = {}
        if stored == identity:
            return
        diffs = _dict_diff(stored, identity)
        text = "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
        if resumable:
            raise ValueError(
                f"workdir {workdir} holds another run ({text}); use another workdir, or "
                "delete it to start over"
            )
        warnings.warn(
            f"workdir {workdir} held another run with no checkpoint ({text}); starting over",
            stacklevel=3,
        )
    if primary:
        io.write_json(path, identity)


def _dict_diff(stored: dict, given: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(stored) | set(given), key=str):
        a, b = stored.get(k, "absent"), given.get(k, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _dict_diff(a, b, f"{prefix}{k}")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a}, given {b}")
    return out


def _resume_metrics(workdir, start: int, primary: bool) -> list[dict]:
    """Records up to the resumed step (one per step); process 0 rewrites the file so."""
    if not workdir:
        return []
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        if start > 0:
            warnings.warn(
                f"{path} is missing; the history holds only steps after {start}", stacklevel=3
            )
        return []
    by_step = {}
    for r in io.read_jsonl(path, recover="delete it (the history then restarts) and rerun"):
        if not isinstance(r, dict) or "step" not in r:
            raise ValueError(f"{path} holds a record without 'step': {str(r)[:80]}")
        if r["step"] <= start:
            by_step[r["step"]] = r
    kept = [by_step[s] for s in sorted(by_step)]
    if primary:
        io.write_jsonl(path, kept)
    return kept


def _check_finite(pending, sums: dict, last_good, ckpt) -> None:
    """Raises on the first non-finite loss in ``pending``; adds the metrics to ``sums``."""
    host = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, host, strict=True):
        loss = np.asarray(metrics["loss"], np.float64)
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss {loss.ravel()[0]} at step {step}; stopped "
                f"({_last_good_text(last_good, ckpt)}). Lower the learning rate or check "
                "the inputs."
            )
        for k, v in metrics.items():
            s, c = sums.get(k, (0.0, 0))
            sums[k] = (s + float(np.mean(v)), c + 1)


def _last_good_text(last_good, ckpt) -> str:
    if ckpt is None:
        return "no workdir, so no checkpoints"
    if last_good is None:
        return "there is no good checkpoint"
    return f"the last good checkpoint is step {last_good}"


@jax.jit
def _all_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves((state.params, state.model_state, state.opt_state))
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _to_float(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def num_params(params: PyTree) -> int:
    """Total number of scalars in a pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
