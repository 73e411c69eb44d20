"""A `wspace.training.fit` workdir's run identity (``fit.json``) and metric history.

A rerun with another identity is refused with the difference; a resumed run reads its
records back from ``metrics.jsonl``, truncated to the resumed step.
"""

from __future__ import annotations

import json
import os
import warnings

from wspace import io


def _check_identity(workdir, state, num_steps, seed, batch_size, primary, identity=None) -> None:
    """Stores the run's identity in ``workdir/fit.json``, or refuses a different one.

    The identity is num_steps, seed, batch_size, the parameter signature and the caller's
    ``identity`` (e.g. its whole config: learning rate, model, ...) under ``"run"``. A
    workdir without checkpoints holds nothing to resume (e.g. a run that failed at its
    first step, or whose checkpoints were deleted to start over): its identity is replaced
    with a warning, so a fixed rerun just works.
    """
    path = os.path.join(workdir, "fit.json")
    current = {
        "num_steps": int(num_steps),
        "seed": seed,
        "batch_size": None if batch_size is None else int(batch_size),
        "params": io.tree_signature(state.params),
    }
    if identity is not None:
        try:  # stored as JSON, so compare as JSON (tuples become lists)
            current["run"] = json.loads(io.dumps(identity))
        except (TypeError, ValueError) as e:
            raise ValueError(f"fit identity must be JSON-able, got {identity!r}: {e}") from None
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resumable = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if os.path.exists(path):
        recover = f"delete only {path} (the checkpoints stay valid) and rerun to resume"
        try:
            stored = io.read_json(path, recover=recover)
        except ValueError:
            if resumable:
                raise
            stored = {}
        if stored == current:
            return
        diffs = _dict_diff(stored, current)
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
        io.write_json(path, current)


def _dict_diff(stored: dict, given: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(stored) | set(given), key=str):
        a, b = stored.get(k, "absent"), given.get(k, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _dict_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a}, given {b}")
    return out


def _resume_metrics(workdir, start: int, primary: bool, saved: dict | None = None) -> list[dict]:
    """Records up to the resumed step (one per step); process 0 rewrites the file so.

    ``saved`` is the newest record at the checkpoint's save (stored in its meta): a run
    killed while writing it leaves a torn last line, so it is written again from there.
    """
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
    if saved is not None and saved.get("step", start + 1) <= start:
        by_step.setdefault(saved["step"], saved)
    kept = [by_step[s] for s in sorted(by_step)]
    if primary:
        io.write_jsonl(path, kept)
    return kept
