"""The generic training loop `fit` and the batch stream and fused calls it drives.

`fit` drives any train step over a `wspace.data.Dataset` or any iterable of batches,
evaluates with any ``eval_fn(state) -> dict`` (classification by default), writes
metrics through `wspace.io` writers, and checkpoints, verifies and resumes through
`wspace.io.Checkpointer` (all file handling lives in `wspace.io`). Its argument and
finiteness checks are `wspace.training._guards`; a workdir's run identity and metric
history on resume are `wspace.training._workdir`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wspace import data as data_lib
from wspace import io
from wspace.training._evaluation import classification_eval
from wspace.training._guards import (
    _all_finite,
    _check_callables,
    _check_finite,
    _check_fit_seed,
    _last_good_text,
    _validate_fit,
)
from wspace.training._placement import (
    _addressable,
    _check_mode,
    _state_sharding,
    default_mesh,
    place_batch,
    place_state,
    unplace_state,
)
from wspace.training._state import TrainState, _is_int
from wspace.training._workdir import _check_identity, _resume_metrics

# Calls of a step in flight before `fit` waits for their metrics. XLA:CPU blocks a
# dispatch once 32 computations are in flight; with a step that calls back to the host
# (FIP's unconverged warning) that wait never ended: `make demo` hung at 50, the dispatch
# blocked and every XLA thread idle (jax-ml/jax#25861). At 16 the limit is never reached.
_MAX_IN_FLIGHT = 16


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
    seed: int | Sequence[int] = 0,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    workdir: str | None = None,
    checkpoint_every: int | None = None,
    tx_args: dict | Callable[[dict], dict] | None = None,
    writer: io.MetricWriter | None = None,
    train_eval_examples: int | None = 1000,
    progress: bool = True,
    steps_per_call: int | None = None,
    identity: Any = None,
) -> tuple[TrainState, list[dict]]:
    """Trains from ``state.step`` to ``num_steps`` with periodic evaluation and checkpoints.

    Every ``eval_every`` steps (and at the end) a record ``{"step", "time", "batch_<m>"
    (mean of each train-step metric since the last record), **eval_fn(state)}`` is added
    to the history and sent to the metric writers.

    Seeds as an axis: with a step built with ``seed_axis=True`` and a state from
    `init_states`, ``seed`` is the list of S seeds; each seed draws its own data order,
    every record value is a list (one per seed), one checkpoint holds all seeds, and each
    seed's result equals that seed trained alone (to floating-point tolerance).

    Fused steps: the steps between two evaluations/checkpoints run as ``lax.scan`` calls
    of ``steps_per_call`` steps (`TrainStep.scan`): the same state as one call per step,
    bit for bit for dense nets on CPU (tested; a convolution in the loop body may differ in
    the last bits). Default: one call per step in jit mode on CPU, where the scan measured
    slower (10 seeds x 1,000 steps: ConvNet on mnist1d 26.7 s vs 11.7 s, MLP on digits
    3.2 s vs 3.0 s); elsewhere (sharded, pmap, accelerators) the largest divisor of the
    evaluation/checkpoint period whose stacked batches stay under 64 MiB. The progress bar
    advances per call and its rate starts after the first call, so its ETA does not count
    compilation.

    With a ``workdir``: the workdir is locked (`wspace.io.workdir_lock`); its ``fit.json``
    holds the run's identity (num_steps, seed(s), batch_size, parameter shapes/dtypes, the
    caller's ``identity``) and a rerun with another identity is refused with the
    difference; ``metrics.jsonl`` gets every record (a torn last line is written again);
    a verified orbax checkpoint (`wspace.io.Checkpointer`) is written every
    ``checkpoint_every`` steps and at the end, only of a state whose every parameter,
    model-state and optimizer leaf is finite. A rerun resumes from the newest valid
    checkpoint (a damaged one falls back with a warning), truncates ``metrics.jsonl`` to
    it and skips the batches already consumed: bit-identical to an uninterrupted run on
    CPU. A non-finite loss or state stops the run with `FloatingPointError` naming the
    step and how to start over (a finite checkpoint may already be diverging, so it is
    not offered as a restart point). In a multi-process run every process
    calls `fit`; only process 0 locks, writes ``fit.json``/``metrics.jsonl`` and calls
    ``writer`` (orbax coordinates the checkpoint writes itself).

    Args:
      state: a host `TrainState` (from `init_state`, or `init_states` for a seed axis).
      train_step: from `make_train_step` with the same ``mode``/``mesh`` (any
        ``step(state, batch, tx_args)`` callable also works, one call per step).
      data: a `wspace.data.Dataset` (batches of ``batch_size`` drawn by
        `wspace.data.batches` with ``seed``, this process's slice in multi-host runs), or
        any iterable of batch dicts (this process's slice; with a seed axis, batches of
        every seed stacked on axis 0); resuming at step k skips the first k batches.
      num_steps: total steps (counted from step 0, also when resuming).
      batch_size: global batch size (needed for a Dataset).
      eval_fn: ``eval_fn(state) -> dict`` on the unplaced state; default for a
        Dataset: `classification_eval` (needs ``apply_fn``); none for other data.
      apply_fn: ``model.apply``, for the default evaluation.
      eval_every: record period in steps.
      seed: data-order seed (a list of seeds for a step with a seed axis).
      mode, mesh: as `make_train_step`.
      workdir: where the lock, identity, metrics and checkpoints go (None: nothing written).
      checkpoint_every: checkpoint period in steps (default: ``eval_every``).
      tx_args: extra arguments for ``tx.update``: a dict, or ``tx_args(batch) -> dict``
        called with each host batch (in multi-host runs it must return the same values on
        every process); shared by all seeds.
      writer: a metric writer (`wspace.io`) that also gets every record (process 0 only;
        steps redone after a resume are written to it again; per-seed values as
        ``<name>/seed_<s>``).
      train_eval_examples: training examples the default evaluation uses (None: all).
      progress: show a tqdm progress bar.
      steps_per_call: steps per compiled call (None: automatic, see above; 1: one call
        per step).
      identity: JSON-able, whatever else shapes the result (e.g. the experiment's config
        with its learning rate): part of ``fit.json``'s identity, so a rerun with another
        one never resumes these checkpoints.

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
    seed_axis = bool(getattr(train_step, "seed_axis", False))
    seed = _check_fit_seed(seed, seed_axis, state)
    if steps_per_call is not None and not (_is_int(steps_per_call) and steps_per_call >= 1):
        raise ValueError(f"steps_per_call must be an int >= 1 or None, got {steps_per_call!r}")
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    is_dataset = isinstance(data, data_lib.Dataset)
    if eval_fn is None and is_dataset:
        if apply_fn is None:
            raise ValueError("fit on a Dataset needs apply_fn (default evaluation) or eval_fn")
        eval_fn = classification_eval(
            apply_fn, data, train_eval_examples=train_eval_examples, mode=mode, mesh=mesh,  # type: ignore[arg-type]
            seed_axis=seed_axis,
        )  # fmt: skip
    primary = jax.process_index() == 0
    period = math.gcd(eval_every, checkpoint_every or eval_every)
    with contextlib.ExitStack() as stack:
        if workdir and primary:
            stack.enter_context(io.workdir_lock(workdir))
        ckpt = last_good = meta = None
        # running sums of the step metrics since the last record (saved with it)
        sums: dict[str, tuple[Any, int]] = {}
        if workdir:
            _check_identity(workdir, state, num_steps, seed, batch_size, primary, identity)
            ckpt = io.Checkpointer(os.path.join(workdir, "checkpoints"))
            stack.callback(ckpt.close)
            if ckpt.all_steps():
                sharding = _state_sharding(mode, mesh, seed_axis, state)
                last_good, state, meta = ckpt.restore_with_step(state, sharding=sharding)
                sums = {
                    k: (np.asarray(s), c) for k, (s, c) in (meta or {}).get("window", {}).items()
                }
        start = int(np.ravel(jax.device_get(_addressable(state.step)))[0])
        history = _resume_metrics(workdir, start, primary, (meta or {}).get("record"))
        writers: list[io.MetricWriter] = (
            [io.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))] if workdir else []
        )
        writers = writers + ([writer] if writer is not None else []) if primary else []
        stack.callback(lambda: [w.close() if w is not writer else w.flush() for w in writers])  # type: ignore[func-returns-value]
        stream = _batch_stream(data, batch_size, seed, seed_axis) if is_dataset else iter(data)  # type: ignore[arg-type]  # is_dataset narrows data
        stream = itertools.islice(stream, start, None)  # resume: skip the batches already seen
        bar = progress_bar(
            total=num_steps, initial=start, disable=not (progress and primary), desc="train"
        )
        stack.callback(bar.close)
        placed = place_state(jax.tree.map(jnp.copy, state), mode, mesh, seed_axis=seed_axis)
        pending = []  # step metrics not yet checked for finiteness
        t0 = time.time()
        first = next(stream, None)
        stream = itertools.chain([first] if first is not None else [], stream)
        chunk = steps_per_call or (_auto_chunk(first, period, train_step) if first else 1)
        step = start
        while step < num_steps:
            n = _chunk_len(step, num_steps, period, chunk)
            batches = list(itertools.islice(stream, n))
            if len(batches) < n:
                raise ValueError(
                    f"data ran out after {step + len(batches)} batches; num_steps={num_steps}"
                )
            placed, metrics = _run_steps(train_step, placed, batches, tx_args, mode, mesh)
            pending.append((step + 1, n, metrics))
            bar.update(n)
            if step == start:  # the first call compiled: the rate counts from now
                _restart_rate(bar)
            step += n
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = ckpt is not None and (step % (checkpoint_every or eval_every) == 0)
            is_ckpt = is_ckpt or (ckpt is not None and step == num_steps)
            if is_eval or is_ckpt or len(pending) >= _MAX_IN_FLIGHT:
                _check_finite(_host_metrics(pending), sums, last_good, ckpt, seed_axis)
                pending = []
            if is_ckpt and not bool(_all_finite(placed)):
                raise FloatingPointError(
                    f"non-finite parameters or optimizer state after step {step}; not "
                    f"checkpointed, stopped ({_last_good_text(last_good, ckpt)}). "
                    "Lower the learning rate or check the inputs."
                )
            if is_eval:
                record = {"step": step, "time": round(time.time() - t0, 3)}
                record.update({f"batch_{k}": _to_float(s / c) for k, (s, c) in sums.items()})
                sums = {}
                if eval_fn is not None:
                    evals = eval_fn(unplace_state(placed, mode))
                    record.update({k: _to_float(v) for k, v in evals.items()})
                history.append(record)
                for w in writers:
                    w.write_scalars(step, _writer_scalars(record, seed, w is writer))
                if "test_accuracy" in record:
                    bar.set_postfix(test_acc=_short(record["test_accuracy"]))
            if is_ckpt:
                window = {k: (np.asarray(s).tolist(), c) for k, (s, c) in sums.items()}
                meta = {"window": window, "record": history[-1] if history else None}
                ckpt.save(step, unplace_state(placed, mode), meta=meta)  # type: ignore[union-attr]  # is_ckpt: ckpt set  # record: if torn
                last_good = step
    return unplace_state(placed, mode), history


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar: the notebook widget where ipywidgets is installed, else plain text
    (`tqdm.auto` without ipywidgets warns ``IProgress not found`` in notebooks)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(**kwargs)


def _batch_stream(data: data_lib.Dataset, batch_size: int, seed, seed_axis: bool):
    """Batches of a Dataset: this process's slice, or with a seed axis every seed's batch."""
    if not seed_axis:
        return data_lib.batches(
            data.x_train, data.y_train, batch_size, seed=seed, epochs=None,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
    return data_lib.seed_batches(data.x_train, data.y_train, batch_size, seed)


def _chunk_len(step: int, num_steps: int, period: int, chunk: int) -> int:
    """Steps in the next call: ``chunk``, never past an evaluation/checkpoint boundary."""
    boundary = min(num_steps, (step // period + 1) * period)
    return min(chunk, boundary - step)


def _auto_chunk(batch: dict, period: int, train_step) -> int:
    """1 on one CPU device (see `fit`), else the largest divisor of ``period`` whose
    stacked batches stay under 64 MiB."""
    if not getattr(train_step, "can_scan", False) or _one_cpu_device(train_step):
        return 1
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch))
    cap = max(1, min(period, (64 << 20) // max(nbytes, 1)))
    return max(d for d in range(1, cap + 1) if period % d == 0)


def _one_cpu_device(train_step) -> bool:
    """A jit-mode step on CPU: one call per step is faster there than a scan (see `fit`);
    sharded and pmap steps over many devices still gain from the scan (1.8x in a test)."""
    return getattr(train_step, "mode", "jit") == "jit" and jax.default_backend() == "cpu"


def _run_steps(train_step, placed, batches: list, tx_args, mode: str, mesh):
    """Runs ``len(batches)`` steps: one `TrainStep.scan` call, or one call per step."""
    seed_axis = getattr(train_step, "seed_axis", False)
    per_step = callable(tx_args)
    args = [tx_args(b) for b in batches] if per_step else [tx_args] * len(batches)
    if len(batches) == 1 or not getattr(train_step, "can_scan", False):
        metrics = []
        for batch, a in zip(batches, args, strict=True):
            placed, m = train_step(placed, place_batch(batch, mode, mesh, seed_axis=seed_axis), a)
            metrics.append(m)
        return placed, metrics
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    stacked = place_batch(stacked, mode, mesh, seed_axis=seed_axis, stacked=True)
    if per_step:
        step_args = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *args)
        return train_step.scan(placed, stacked, step_args, per_step_args=True)
    return train_step.scan(placed, stacked, tx_args)


def _host_metrics(pending: list) -> list[tuple[int, dict]]:
    """``[(step, metrics on the host)]`` from calls of one step (a list) or many (stacked)."""
    host = jax.device_get(_addressable([m for _, _, m in pending]))
    out = []
    for (first, n, _), metrics in zip(pending, host, strict=True):
        if isinstance(metrics, list):
            out += [(first + i, m) for i, m in enumerate(metrics)]
        else:
            out += [(first + i, {k: v[i] for k, v in metrics.items()}) for i in range(n)]
    return out


def _restart_rate(bar) -> None:
    """Counts the bar's rate from now: its ETA leaves out the first call's compilation."""
    if not bar.disable:
        bar.start_t = bar.last_print_t = bar._time()
        bar.initial = bar.last_print_n = bar.n


def _writer_scalars(record: dict, seed, flatten: bool) -> dict:
    """A record without its step; per-seed lists become ``<name>/seed_<s>`` for ``flatten``."""
    out = {}
    for k, v in record.items():
        if k == "step":
            continue
        if flatten and isinstance(seed, list) and isinstance(v, list):
            out.update({f"{k}/seed_{s}": x for s, x in zip(seed, v, strict=True)})
        else:
            out[k] = v
    return out


def _short(v) -> str:
    return f"{np.mean(v):.3f}"


def _to_float(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
