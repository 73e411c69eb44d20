"""The experiment layer every method shares: configs, one arms x seeds runner, claims.

An experiment is a config and a function (flax ``examples/``, big_vision):

* ``experiments/configs/<name>.py`` has ``get_config(arg)`` returning an
  ml_collections ``ConfigDict``; ``arg`` picks a size: ``quick`` (smoke tests,
  seconds), ``small`` (what ``make demo`` reports) or ``paper`` (full size).
* ``experiments/<name>.py`` has ``run(config, workdir) -> results`` (callable
  in-process) and ends with ``cli.main(run, "<name>")``, its command line
  (`experiments.cli`).

A run writes into its workdir: ``config.json`` (a rerun with another config is
refused with the difference), ``arms/<arm>/seed_<s>.json`` (one per arm and seed,
skipped on rerun, so a killed run resumes; ``arms/seconds.json`` keeps each one's
compute time), ``results.json`` (claims, tables, figures, provenance) and PNG figures.
The report (`experiments.report`) and the README are generated from ``results.json``.

An experiment declares its arms and claims as data (`experiments.claims`)::

    CLAIMS = [
        Claim("Late-phase weights beat SGD in test accuracy", "test_accuracy", "late", "sgd",
              per_example="test_correct"),
        Claim("Late-phase weights have lower test NLL", "test_nll", "late", "sgd",
              higher_is_better=False),
        Claim("ULR is within 0.02 of backprop", "test_accuracy", "ulr", "bp", margin=0.02),
    ]

    def run(config, workdir):
        start(config, workdir)
        per_arm = run_arms(workdir, config, {a: partial(all_seeds, config, a) for a in ...})
        # all_seeds(seeds) trains the seeds as one program (a seed axis) and returns one
        # {"test_accuracy": ..., "test_correct": pack_correct(pred == y)} per seed
        claims = judge(CLAIMS, per_arm, skip_missing=True)   # arms the config did not run
        return save_results(workdir, config, "late_phase", claims=claims, tables=...,
                            figures=[...])

Figures draw every interval with `plot_mean_ci` (mean over seeds, 95% t interval), the
interval of `summarize`'s tables. `save_results` applies Holm over all the claims it
gets and adds ``provenance`` and ``compute_seconds``; ``python -m experiments.report
--verify`` re-derives every claim field from the stored per-seed values.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import claims as claims_lib
from experiments.claims import Claim, judge  # noqa: F401
from experiments.configs.base import DISPLAY_ONLY, NUM_SEEDS, SIZES, base_config  # noqa: F401
from wspace.io import (
    atomic_open,
    read_json,
    workdir_lock,
    write_json,
)
from wspace.stats import mean_ci

VERDICTS = ("holds", "does not hold", "inconclusive")
SMOKE_STAMP = "smoke size, not a result"


# ----------------------------------------------------------------------------- configs


def validate_common(config) -> None:
    """Checks the fields of `base_config`; raises ValueError naming the bad value."""
    from wspace.training import MODES

    check(config, choices={"size": SIZES, "mode": MODES}, counts=("num_seeds",))
    _check_dataset_name(config.dataset)
    if config.get("tensorboard") and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError(
            "config.tensorboard=True needs tensorboardX: pip install 'wspace[tensorboard]'"
        )


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "counts": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
    "positive": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "nonnegative": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
    "fractions": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "open_fractions": (lambda v: 0 < v < 1, "in (0, 1)"),
    "widths": (lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of widths >= 1"),
}


def check(
    config,
    subsets: Mapping[str, Sequence] | None = None,
    *,
    choices: Mapping[str, Sequence] | None = None,
    **rules: Sequence[str],
) -> None:
    """Validates fields by rule; raises ValueError naming the first bad field and its value.

    ``rules`` maps a rule (``counts``, ``positive``, ``nonnegative``, ``fractions``,
    ``open_fractions``, ``widths``) to the fields it applies to; ``choices`` maps a field to
    its allowed values; ``subsets`` maps a list-valued field to its allowed values (the
    list must be non-empty), e.g. ``check(config, counts=("steps",), positive=("lr",),
    choices={"optimizer": ("sgd", "adam")}, subsets={"arms": ARMS})``.
    """
    for rule, fields in rules.items():
        if rule not in _RULES:
            raise TypeError(f"check: unknown rule {rule!r}; use one of {sorted(_RULES)}")
        ok, what = _RULES[rule]
        for field in fields:
            if not ok(config[field]):
                raise ValueError(f"config.{field}={config[field]!r}; must be {what}")
    for field, allowed in (choices or {}).items():
        if config[field] not in allowed:
            raise ValueError(f"config.{field}={config[field]!r}; use one of {tuple(allowed)}")
    for field, allowed in (subsets or {}).items():
        given = list(config[field])
        bad = [a for a in given if a not in allowed]
        if bad or not given:
            what = f"unknown {bad}" if bad else "empty"
            raise ValueError(f"config.{field}={given!r} ({what}); use a subset of {tuple(allowed)}")


def _check_dataset_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"config.dataset={name!r}; give mnist1d, digits, npz:PATH or a TFDS name")
    if name.startswith("npz:") and not os.path.exists(name[4:]):
        raise ValueError(f"config.dataset={name!r}: no such file {name[4:]!r}")


def metric_writer(config, workdir: str | None) -> contextlib.AbstractContextManager:
    """TensorBoard logs under ``<workdir>/tb`` if ``config.tensorboard``, as a context.

    ``with metric_writer(config, seeds_workdir(workdir, arm, seeds)) as writer:
    fit(..., writer=writer)``: the writer is a `wspace.io.TensorBoardWriter`, closed when
    the block ends, or None when TensorBoard is off or there is no workdir. View the logs
    with ``tensorboard --logdir <workdir>``.
    """
    if not config.get("tensorboard") or workdir is None:
        return contextlib.nullcontext()
    import wspace as ws

    return ws.io.TensorBoardWriter(os.path.join(workdir, "tb"))


def seeds(config) -> list[int]:
    """The run's seeds: ``config.seed, ..., config.seed + num_seeds - 1``."""
    return list(range(config.seed, config.seed + config.num_seeds))


def load_dataset(config, standardize: bool = True):
    """``config.dataset`` from ``config.data_dir`` (standardized by default)."""
    import wspace as ws

    ds = ws.data.load(config.dataset, data_dir=config.data_dir or None)
    return ws.data.standardize(ds) if standardize else ds


# ----------------------------------------------------------------------------- workdir


def run_identity(config) -> dict:
    """The config as JSON without its display-only fields: what shapes a run's results.

    Experiments pass it to `wspace.training.fit` as ``identity``, so checkpoints of
    another config (another learning rate, say) are never resumed.
    """
    return {
        k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in DISPLAY_ONLY
    }


def start(config, workdir: str) -> None:
    """Validates the common fields, then creates ``workdir`` and records ``config.json``.

    Call it after the experiment's own validation, before any work: a workdir
    holding results of another config is refused with the fields that differ,
    so results of two configs are never mixed. The config of a run that stored no
    result yet (one stopped by a typo, by Ctrl-C, or that diverged) is replaced with a
    warning, and that run starts over: its partial state (checkpoints, metrics) is moved
    to ``workdir/stale-<time>/``, never resumed. The workdir is locked for the rest of
    this process (`wspace.io.workdir_lock`): a second run fails at once.
    """
    from absl import logging

    validate_common(config)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    new = json.loads(config.to_json_best_effort())
    if not _is_writer():
        return
    _lock_for_this_process(workdir)
    path = os.path.join(workdir, "config.json")
    old = read_json(path) if os.path.exists(path) else None
    if old is not None:
        diff = {
            k: (old.get(k), new.get(k))
            for k in sorted(set(old) | set(new))
            if k not in DISPLAY_ONLY and old.get(k) != new.get(k)
        }
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        if diff and not _has_results(workdir):
            moved = _move_aside(workdir)
            where = f"; its partial state moved to {moved}" if moved else ""
            msg = f"{workdir}: replacing the config of a run that stored no result ({lines}){where}"
            warnings.warn(msg, stacklevel=2)
        elif diff:
            raise ValueError(
                f"{workdir} holds a run with another config ({lines}); "
                "use a new --workdir or delete this one"
            )
    write_json(path, new)


def _move_aside(workdir: str) -> str | None:
    """Moves everything a run left in ``workdir`` (but its config, lock and earlier stale
    folders) into a new ``workdir/stale-<time>/``; returns that folder (None: nothing)."""
    import time

    leftovers = [
        n
        for n in sorted(os.listdir(workdir))
        if n != "config.json" and not n.startswith((".", "stale-"))
    ]
    if not leftovers:
        return None
    dest = os.path.join(workdir, time.strftime("stale-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(workdir, time.strftime(f"stale-%Y%m%d-%H%M%S-{n}"))
    os.makedirs(dest)
    for name in leftovers:
        os.replace(os.path.join(workdir, name), os.path.join(dest, name))
    return dest


def _has_results(workdir: str) -> bool:
    """Whether a run in ``workdir`` stored any result (an arm's seed, or results.json)."""
    arms = os.path.join(workdir, "arms")
    stored = any(files for _, _, files in os.walk(arms)) if os.path.isdir(arms) else False
    return stored or os.path.exists(os.path.join(workdir, "results.json"))


_LOCKS: dict[str, Any] = {}


def _is_writer() -> bool:
    """In a multi-process run every process computes and process 0 alone writes files."""
    import jax

    return jax.process_index() == 0


def _lock_for_this_process(workdir: str) -> None:
    """Holds ``workdir_lock(workdir)`` until the process exits (once per workdir)."""
    import atexit

    real = os.path.realpath(workdir)
    if real not in _LOCKS:
        _LOCKS[real] = lock = workdir_lock(workdir)
        lock.__enter__()
        atexit.register(lock.__exit__, None, None, None)


def release_locks() -> None:
    """Releases this process's workdir locks now (before ``os._exit``, which skips atexit)."""
    for lock in _LOCKS.values():
        lock.__exit__(None, None, None)
    _LOCKS.clear()


def run_arms(
    workdir: str, config, arm_fns: Mapping[str, Callable[[list[int]], list[dict]]]
) -> dict[str, list[dict]]:
    """Runs every arm for all seeds of ``config`` at once, caching each seed's result.

    Args:
      workdir: the experiment's workdir (after `start`).
      config: the run's config (its ``seed``, ``num_seeds`` and ``progress``).
      arm_fns: arm name -> ``fn(seeds) -> [dict of JSON-able metrics, one per seed]``;
        ``fn`` trains its seeds as one program (a seed axis, `wspace.training.init_states`).
        Wrap a one-seed function with `per_seed` where an axis does not fit.

    Returns:
      ``{arm: [result for each seed, in seed order]}``; each result is stored in
      ``workdir/arms/<arm>/seed_<s>.json`` and read back instead of rerun (only the
      missing seeds are run). In a multi-process run every process reads the stored
      results (a shared workdir) and runs the same missing ones; process 0 alone writes.
    """
    results: dict[str, list[dict]] = {}
    for arm, fn in arm_fns.items():
        paths = {s: os.path.join(workdir, "arms", arm, f"seed_{s}.json") for s in seeds(config)}
        missing = [s for s, path in paths.items() if not os.path.exists(path)]
        if missing:
            if config.progress:
                print(f"[{arm}: seeds {_seed_text(missing)}]", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            computed = [dict(r) for r in fn(missing)]
            if len(computed) != len(missing):
                raise ValueError(f"arm {arm!r} returned {len(computed)} results for {missing}")
            for seed, result in zip(missing, computed, strict=True):
                _check_finite_metrics(result, f"arm {arm!r} seed {seed}")
            if _is_writer():
                for seed, result in zip(missing, computed, strict=True):
                    write_json(paths[seed], result)
                _store_seconds(
                    workdir, f"{arm}/seeds_{_seed_text(missing)}", time.perf_counter() - t0
                )
        done = dict(zip(missing, computed, strict=True)) if missing else {}
        results[arm] = [done[s] if s in done else read_json(p) for s, p in paths.items()]
    return results


def seeds_workdir(workdir: str, arm: str, seeds_: Sequence[int]) -> str:
    """The one workdir (checkpoints, metrics) of ``arm`` trained for ``seeds_`` at once."""
    return os.path.join(workdir, "train", arm, f"seeds_{_seed_text(seeds_)}")


def _seed_text(seeds_: Sequence[int]) -> str:
    """``3-7`` for a range, else ``1_4_9``."""
    s = list(seeds_)
    if len(s) > 1 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return "_".join(map(str, s))


def _store_seconds(workdir: str, unit: str, seconds: float) -> None:
    """Records how long one arm's seeds took in ``workdir/arms/seconds.json``."""
    path = os.path.join(workdir, "arms", "seconds.json")
    times = read_json(path) if os.path.exists(path) else {}
    write_json(path, {**times, unit: round(seconds, 3)})


def _stored_seconds(workdir: str) -> float | None:
    """The summed stored times of the workdir's arms (None when none was recorded)."""
    path = os.path.join(workdir, "arms", "seconds.json")
    return round(sum(read_json(path).values()), 1) if os.path.exists(path) else None


def _check_finite_metrics(result: dict, where: str) -> None:
    """A run never reports NaN as a number: non-finite scalars are errors."""
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{where}: metric {k!r} is {v}")


# ----------------------------------------------------------------------------- statistics


def plot_mean_ci(ax, x, values, *, label=None, style="-", color=None, bars=False):
    """Draws the mean over seeds of ``values`` (seeds x len(x)) with its 95% t interval.

    A shaded band by default, error bars with ``bars=True`` (for few or categorical x);
    one seed draws the line alone. Returns the mean.
    """
    mean, half = mean_ci(values)
    half = np.nan_to_num(half)  # one seed: no interval
    if bars:
        ax.errorbar(x, mean, yerr=half, fmt=style, color=color, capsize=3, label=label)
    else:
        (line,) = ax.plot(x, mean, style, color=color, label=label)
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.2, lw=0)
    return mean


def seed_curves(history: Sequence[dict], keys: Sequence[str]) -> list[list[dict]]:
    """Each seed's curve from a seed-axis `wspace.training.fit` history (every record value
    a list, one item per seed): ``[[{"step": ..., key: ...} for each record] for each seed]``."""
    num_seeds = len(history[-1][keys[0]])
    return [[{"step": r["step"], **{k: r[k][i] for k in keys}} for r in history]
            for i in range(num_seeds)]  # fmt: skip


def plot_curves(ax, per_arm: Mapping[str, list[dict]], metric: str, **kw) -> None:
    """``metric`` of each arm's `seed_curves` (result field ``curve``) by step, as
    `plot_mean_ci` lines labelled by arm (``kw``: its style)."""
    for arm, results in per_arm.items():
        values = [[r[metric] for r in result["curve"]] for result in results]
        steps = [r["step"] for r in results[0]["curve"]]
        plot_mean_ci(ax, steps, values, label=arm, **kw)


def summarize(per_arm: Mapping[str, list[dict]], metrics: Sequence) -> dict:
    """A table of mean ± 95% half-width per arm (rows) and metric (columns)."""
    names = [m if isinstance(m, str) else getattr(m, "__name__", "metric") for m in metrics]
    rows = []
    for arm, results in per_arm.items():
        row: list[Any] = [arm]
        for m in metrics:
            mean, half = mean_ci(claims_lib.metric_values(results, m))
            row.append([float(mean), float(half)])
        rows.append(row)
    return {"columns": ["arm", *names], "rows": rows}


# ----------------------------------------------------------------------------- outputs


def save_results(
    workdir: str,
    config,
    name: str,
    *,
    claims: Sequence[dict] = (),
    tables: Mapping[str, dict] | None = None,
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Writes ``results.json`` atomically and returns it.

    The report and the README read these fields: ``method``, ``size``,
    ``smoke`` (quick size: not a result), ``seeds``, ``claims`` (from `judge`, with
    Holm's adjustment redone over all of them), ``tables`` (from `summarize`),
    ``figures`` (PNG names in the workdir), ``notes``, ``provenance`` and
    ``compute_seconds`` (the arms' stored times: kept from the run that computed them).
    """
    results = {
        "method": name,
        "size": config.size,
        "smoke": config.size == "quick",
        "dataset": config.dataset,
        "seeds": seeds(config),
        "claims": claims_lib.adjust([dict(c) for c in claims]),
        "tables": dict(tables or {}),
        "figures": [os.path.basename(f) for f in figures],
        "notes": list(notes),
        "provenance": provenance(),
        "compute_seconds": _stored_seconds(workdir),
        **dict(extra or {}),
    }
    if _is_writer():
        write_json(os.path.join(workdir, "results.json"), results)
    return results


def provenance() -> dict:
    """Where a result came from: commit (and a dirty tree), versions, backend, machine, the
    ``XLA_FLAGS`` it ran under (they can change the floating-point path), date."""
    import datetime
    import platform
    import subprocess
    from importlib import metadata

    import jax

    def git(*args):
        try:
            cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
            return out.stdout.strip() if out.returncode == 0 else None
        except OSError:  # no git on this machine
            return None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    packages = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "wspace")
    versions = {}
    for p in packages:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "versions": versions,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} logical cores)" if names else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def savefig(fig, workdir: str, name: str, config=None) -> str:
    """Saves a matplotlib figure as PNG in ``workdir`` (atomically), closes it, returns the path.

    Figures of a quick-size run carry a visible "smoke size, not a result" stamp.
    """
    import matplotlib.pyplot as plt

    if config is not None and config.size == "quick":
        fig.text(
            0.5, 0.5, SMOKE_STAMP, ha="center", va="center", fontsize=20, color="red",
            alpha=0.35, rotation=20, transform=fig.transFigure,
        )  # fmt: skip
    path = os.path.join(workdir, name)
    if _is_writer():
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- arm helpers


def fit_seeds(config, workdir, arm, seeds_, state, loss, tx, data, *, mode=None, **kwargs):
    """Trains ``arm`` for ``seeds_`` as one program (a seed axis); returns ``(state, history)``.

    `wspace.training.make_train_step` (``mode``: default ``config.mode``; ``estimator`` and
    ``seed_tx_args`` from ``kwargs``), then `wspace.training.fit` (the other ``kwargs``),
    with TensorBoard logs in the arm's `seeds_workdir` if ``config.tensorboard``.
    """
    import wspace as ws

    mode = mode or config.mode
    step_kwargs = {k: kwargs.pop(k) for k in ("estimator", "seed_tx_args") if k in kwargs}
    step = ws.training.make_train_step(loss, tx, mode=mode, seed_axis=True, **step_kwargs)
    with metric_writer(config, seeds_workdir(workdir, arm, seeds_)) as writer:
        return ws.training.fit(state, step, data, seed=seeds_, mode=mode, writer=writer, **kwargs)


def seeds_by_arm(per_arm: Mapping[str, list[dict]], arms: Sequence[str], metric) -> np.ndarray:
    """``[seeds, len(arms)]``: ``metric`` (a key or ``fn(result)``) of each seed in each arm."""
    return np.array([claims_lib.metric_values(per_arm[a], metric) for a in arms]).T


def plot_by_arm(ax, per_arm: Mapping[str, list[dict]], series: Mapping[str, str], rotation=20):
    """Each ``series`` (metric -> label) by arm (x) as `plot_mean_ci` bars, 0.2 apart."""
    arms, pos = list(per_arm), np.arange(len(per_arm))
    for j, (metric, label) in enumerate(series.items()):
        shift = 0.2 * (j - (len(series) - 1) / 2)
        values = seeds_by_arm(per_arm, arms, metric)
        plot_mean_ci(ax, pos + shift, values, style="o", label=label, bars=True)
    ax.set_xticks(pos, arms, rotation=rotation, ha="right")
