"""One home for file I/O: atomic files, JSON readers that name the file, metric writers,
workdir locks and verified checkpoints.

Everything wspace writes goes through here:

* `atomic_open` (temp file + rename): readers never see half a file, files get the
  umask's normal mode (0644 under umask 022), and the temp file a killed writer leaves
  is removed by the next write to that directory.
* `write_json` / `read_json` / `read_jsonl` / `write_jsonl`: a damaged file is named in a
  one-line error that says how to recover; a torn last JSONL line (what a crash while
  appending leaves) is dropped with a warning.
* Metric writers share ``write_scalars(step, scalars)``, ``flush()``, ``close()`` (the clu
  interface): `JsonlWriter` (default, ``metrics.jsonl``), `TensorBoardWriter` (the optional
  ``tensorboard`` extra, tensorboardX: no TensorFlow needed), `MultiWriter`.
* `workdir_lock`: one process per workdir (a lock file with the holder's pid, an
  ``flock`` that dies with its holder; re-entrant within a process).
* `Checkpointer`: orbax checkpoints saved synchronously, each with a SHA-256 of its leaves
  that is verified on restore; a damaged newest checkpoint falls back to the newest valid
  one with a warning.

This module imports no other wspace module (data and training import it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

PyTree = Any
_TMP_SUFFIX = ".wspace-tmp"
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+" + re.escape(_TMP_SUFFIX) + r"$")


# ----------------------------------------------------------------------------- atomic files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(directory: str) -> None:
    """Deletes temp files of `atomic_open` whose writer process is gone."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TMP_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temp file beside ``path`` and renames it onto ``path`` on success.

    Readers never see half a file, and a killed process leaves ``path`` as it was. The
    file gets the mode a plain ``open`` would give (``0666 & ~umask``: 0644 under umask
    022). The temp file is named ``.<name>.<pid>.<random>.wspace-tmp``; one left by a
    killed process is deleted by the next `atomic_open` in the same directory.

    Args:
      path: the file to write.
      mode: ``"w"`` (text) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(directory)
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=_TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- JSON


def _json_default(x):
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that also accepts numpy and JAX scalars/arrays (as lists)."""
    return json.dumps(obj, default=_json_default, **kwargs)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(dumps(obj, indent=2) + "\n")


def read_json(path: str, *, recover: str = "delete it and rerun") -> Any:
    """Reads a JSON file; a damaged one is a one-line `ValueError` naming it.

    Args:
      path: the file.
      recover: how to recover, appended to the error (e.g. "delete it and rerun").

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not valid JSON (names the file, where, and ``recover``).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = (
            f"line {e.lineno} column {e.colno}: {e.msg}"
            if isinstance(e, json.JSONDecodeError)
            else str(e)
        )
        raise ValueError(f"{path} is not valid JSON ({where}); {recover}") from None


def read_jsonl(path: str, *, recover: str = "delete it and rerun") -> list[Any]:
    """Reads a JSON-lines file (one record per line); a missing file is ``[]``.

    A last line that does not parse is what a crash while appending leaves: it is dropped
    with a warning. A bad line anywhere else is damage: a one-line `ValueError` naming the
    file and the line, and ``recover``.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if i == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped a torn last line ({len(line)} bytes) left by an "
                    "interrupted write",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path} line {i + 1} is not valid JSON (the file is damaged); {recover}"
            ) from None
    return records


def write_jsonl(path: str, records: Iterable[Any]) -> None:
    """Writes records as JSON lines atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.writelines(dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- metric writers


class MetricWriter:
    """The metric-writer interface (as in clu): scalars per step, ``flush``, ``close``."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlWriter(MetricWriter):
    """Appends one JSON line ``{"step": step, **scalars}`` per call to ``path``.

    Each line is written with one ``write`` call and flushed, so a crash leaves at most a
    torn last line, which `read_jsonl` drops.
    """

    def __init__(self, path: str):
        self.path = path
        self._file: IO[str] | None = None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 -- closed in close()
        self._file.write(dumps({"step": int(step), **scalars}) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter(MetricWriter):
    """Writes numeric scalars as TensorBoard events in ``logdir`` (tensorboardX, no TF).

    Needs the optional extra: ``pip install 'wspace[tensorboard]'``.
    """

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardWriter needs tensorboardX: pip install 'wspace[tensorboard]'"
            ) from e
        self.logdir = logdir
        self._writer = SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            if isinstance(value, int | float | np.number) and not isinstance(value, bool):
                self._writer.add_scalar(name, float(value), int(step))
            elif isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0:
                self._writer.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter(MetricWriter):
    """Sends every call to each of ``writers``."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


# ----------------------------------------------------------------------------- workdir lock

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # realpath -> [fd, depth]
_held_guard = threading.Lock()


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


@contextlib.contextmanager
def workdir_lock(path: str) -> Iterator[None]:
    """Holds ``path`` exclusively for this process while the context is open.

    Contract: the lock is ``<path>/.lock``, an ``flock``-ed file holding the holder's pid.
    A second process fails at once with `WorkdirLockedError` naming the workdir and the
    holder's pid; the lock dies with its holder, so a lock file left by a killed process
    (its pid written, no ``flock`` held) is taken over with a warning naming that pid.
    Re-entrant within one process: nested ``workdir_lock(path)`` calls (e.g. an
    experiment's runner and the `wspace.training.fit` it calls) share the lock, which is
    released when the outermost one exits. In a multi-process JAX run (after
    ``jax.distributed.initialize``) only process 0 takes the lock; on the other processes
    this is a no-op, so every process of one run may call it on a shared workdir. Creates
    ``path`` if needed.
    """
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        yield
        return
    os.makedirs(path, exist_ok=True)
    real = os.path.realpath(path)
    with _held_guard:
        if real in _held:
            _held[real][1] += 1
        else:
            _held[real] = [_acquire(real), 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[real][1] -= 1
            if _held[real][1] == 0:
                fd = _held.pop(real)[0]
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)


def _acquire(real: str) -> int:
    lock_path = os.path.join(real, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirLockedError(
                f"workdir {real} is in use by process {holder} (lock file {lock_path}); "
                "wait for it to finish or use another workdir"
            ) from None
        raise
    old = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if old:
        warnings.warn(
            f"workdir {real}: took over the stale lock of process {old} (no longer running)",
            stacklevel=3,
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored and verified."""


def tree_signature(tree: PyTree) -> dict[str, str]:
    """``{keystr: "dtype[shape]"}`` of a pytree's leaves: what a checkpoint must match."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(p): f"{np.dtype(x.dtype).name}{list(np.shape(x))}" for p, x in flat
    }


def tree_sha256(tree: PyTree) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order (host copy).

    Arrays split over several processes (e.g. a seed axis over hosts) are gathered first,
    so every process computes the same hash (a collective: every process must call it).
    """
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Checkpointer:
    """Verified orbax checkpoints of a pytree in ``directory``, keeping the newest few.

    Each step directory holds the tree (orbax ``StandardSave``) and an ``integrity`` item:
    the tree's signature (`tree_signature`) and SHA-256 (`tree_sha256`). `restore` checks
    the signature against ``like`` (a mismatch is a `ValueError`, the checkpoints are left
    alone) and the SHA-256 of what it read; a step that fails to read or verify is moved to
    ``<directory>.damaged/<step>`` with a warning naming it, and the next older one is
    tried. Saves are synchronous, so an orbax failure raises here, at once, with the path.

    Args:
      directory: the checkpoint directory (created on the first save).
      max_to_keep: how many newest steps to keep.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint directory {self.directory} exists and is not a directory")
        parent = self.directory
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint directory {self.directory} is not writable")
        self._ocp = ocp
        self._save_failed = False
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {_one_line(e)}"
            ) from e

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: PyTree, *, meta: Any = None) -> None:
        """Writes ``tree`` as ``step`` (replacing one already there) with its signature and
        SHA-256, and JSON-able ``meta`` (returned by `restore_with_step`); a failure raises
        `CheckpointError` naming the directory."""
        integrity = {"signature": tree_signature(tree), "sha256": tree_sha256(tree)}
        if meta is not None:
            integrity["meta"] = meta
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(tree),
            integrity=self._ocp.args.JsonSave(integrity),
        )
        try:
            if int(step) in self._manager.all_steps():  # the caller's tree replaces it
                self._manager.delete(int(step))
            self._manager.save(int(step), args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as e:
            self._save_failed = True
            raise CheckpointError(
                f"saving checkpoint step {step} in {self.directory} failed: {_one_line(e)}"
            ) from e

    def restore(self, like: PyTree, step: int | None = None, *, sharding: Any = None) -> PyTree:
        """Restores and verifies the newest valid step (or exactly ``step``).

        Args:
          like: a tree with the structure, shapes and dtypes to restore.
          step: a specific step (no fallback), or None for the newest valid one.
          sharding: a `jax.sharding.Sharding` for every restored leaf (default: like's).

        Raises:
          ValueError: the checkpoint holds a tree of another signature than ``like``.
          CheckpointError: no step could be read and verified (one line, with the path).
        """
        return self.restore_with_step(like, step, sharding=sharding)[1]

    def restore_with_step(
        self, like: PyTree, step: int | None = None, *, sharding: Any = None
    ) -> tuple[int, PyTree, dict | None]:
        """`restore`, returning ``(step, tree, meta)``: the step restored and its ``meta``."""
        steps = self.all_steps() if step is None else [int(step)]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        want = tree_signature(like)

        def to_abstract(x):
            s = sharding if sharding is not None else getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

        abstract = jax.tree.map(to_abstract, like)
        with _quiet_asyncio():  # orbax's failed reads also log their tasks' tracebacks
            return self._restore_newest(steps, want, abstract, fallback=step is None)

    def _restore_newest(self, steps, want, abstract, *, fallback: bool):
        failures = []
        for s in reversed(steps):
            path = os.path.join(self.directory, str(s))
            try:
                integrity = self._manager.restore(
                    s, args=self._ocp.args.Composite(integrity=self._ocp.args.JsonRestore())
                )["integrity"]
                if not isinstance(integrity, dict) or "sha256" not in integrity:
                    raise CheckpointError("its integrity record is missing or malformed")
            except Exception as e:
                failures.append((s, path, _one_line(e)))
                continue
            if integrity.get("signature") != want:
                raise ValueError(_signature_diff(path, integrity.get("signature") or {}, want))
            try:
                tree = self._manager.restore(
                    s, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract))
                )["state"]
                if tree_sha256(tree) != integrity["sha256"]:
                    raise CheckpointError("its SHA-256 does not match the saved one")
            except Exception as e:
                failures.append((s, path, _one_line(e)))
                continue
            if fallback:
                for bad_step, bad_path, why in failures:
                    self._quarantine(bad_step, bad_path, why, fallback=s)
            return s, tree, integrity.get("meta")
        detail = "; ".join(f"{p}: {why}" for _, p, why in failures)
        raise CheckpointError(
            f"no valid checkpoint in {self.directory} ({detail}); delete the directory to "
            "start over"
        )

    def _quarantine(self, step: int, path: str, why: str, *, fallback: int) -> None:
        dest = os.path.join(self.directory + ".damaged", str(step))
        if jax.process_index() == 0 and os.path.exists(path):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(path, dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"wspace quarantine {path}")
        warnings.warn(
            f"checkpoint {path} is damaged ({why}); moved it to {dest} and fell back to "
            f"step {fallback}",
            stacklevel=4,
        )
        self._manager.reload()

    def close(self) -> None:
        """Waits for and closes orbax's manager. After a failed save (full disk) closing is
        best effort: the save's `CheckpointError` is the error to report, not a later one."""
        try:
            with _quiet_asyncio():
                self._manager.wait_until_finished()
                self._manager.close()
        except Exception:
            if not self._save_failed:
                raise


@contextlib.contextmanager
def _quiet_asyncio():
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _signature_diff(path: str, have: dict, want: dict) -> str:
    diffs = [
        f"{k}: saved {have.get(k, 'absent')}, given {want.get(k, 'absent')}"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return f"checkpoint {path} holds another tree: {'; '.join(diffs[:3])}{more}"


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."
