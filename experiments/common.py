"""The experiment layer every method shares: configs, one arms x seeds runner, claims.

An experiment is a config and a function (flax ``examples/``, big_vision):

* ``experiments/configs/<name>.py`` has ``get_config(arg)`` returning an
  ml_collections ``ConfigDict``; ``arg`` picks a size: ``quick`` (smoke tests,
  seconds), ``small`` (what ``make demo`` reports) or ``paper`` (full size).
* ``experiments/<name>.py`` has ``run(config, workdir) -> results`` (callable
  in-process) and ends with ``common.main(run, "<name>")``, the absl entry point:
  ``python -m experiments.<name> --workdir=DIR --config=experiments/configs/<name>.py:small
  --config.seed=3``. Flags override config fields; unknown fields are errors.

A run writes into its workdir: ``config.json`` (a rerun with another config is
refused with the difference), ``arms/<arm>/seed_<s>.json`` (one per arm and seed,
skipped on rerun, so a killed run resumes), ``results.json`` (claims with paired
95% intervals and verdicts, tables, figures) and PNG figures. The report
(`experiments.report`) and the README are generated from ``results.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from wspace.io import atomic_open, read_json, workdir_lock, write_json

SIZES = ("quick", "small", "paper")
NUM_SEEDS = {"quick": 2, "small": 5, "paper": 10}
VERDICTS = ("holds", "does not hold", "inconclusive")
SMOKE_STAMP = "smoke size, not a result"


# ----------------------------------------------------------------------------- configs


def base_config(size: str) -> ml_collections.ConfigDict:
    """The fields every experiment has; ``size`` is quick | small | paper.

    Fields: ``size``, ``dataset`` (mnist1d | digits | npz:PATH | a TFDS name),
    ``data_dir`` ("" for none), ``seed`` (the first seed), ``num_seeds``,
    ``mode`` (jit | sharded | pmap), ``progress`` (tqdm bars), ``tensorboard``
    (also write TensorBoard logs under ``<workdir>/tb``: `metric_writer`).
    """
    if size not in SIZES:
        raise ValueError(f"unknown config size {size!r}; use one of {SIZES}")
    return ml_collections.ConfigDict(
        {
            "size": size,
            "dataset": "mnist1d",
            "data_dir": "",
            "seed": 0,
            "num_seeds": NUM_SEEDS[size],
            "mode": "jit",
            "progress": size != "quick",
            "tensorboard": False,
        }
    )


def validate_common(config) -> None:
    """Checks the fields of `base_config`; raises ValueError naming the bad value."""
    from wspace.training import MODES

    if config.size not in SIZES:
        raise ValueError(f"config.size={config.size!r}; use one of {SIZES}")
    require_at_least_one(config, "num_seeds")
    if config.mode not in MODES:
        raise ValueError(f"config.mode={config.mode!r}; use one of {MODES}")
    _check_dataset_name(config.dataset)
    if config.get("tensorboard") and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError(
            "config.tensorboard=True needs tensorboardX: pip install 'wspace[tensorboard]'"
        )


def require_at_least_one(config, *fields: str) -> None:
    """Raises ValueError naming the first of ``fields`` whose value is below 1 (counts, sizes)."""
    for field in fields:
        if config[field] < 1:
            raise ValueError(f"config.{field}={config[field]}; must be >= 1")


def _check_dataset_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"config.dataset={name!r}; give mnist1d, digits, npz:PATH or a TFDS name")
    if name.startswith("npz:") and not os.path.exists(name[4:]):
        raise ValueError(f"config.dataset={name!r}: no such file {name[4:]!r}")


def metric_writer(config, workdir: str | None):
    """A `wspace.io.TensorBoardWriter` logging under ``<workdir>/tb`` if ``config.tensorboard``.

    Returns None when TensorBoard is off or there is no workdir. Pass it as
    `wspace.training.fit`'s ``writer`` and close it after the run; view the logs with
    ``tensorboard --logdir <workdir>``.
    """
    if not config.get("tensorboard") or workdir is None:
        return None
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


def start(config, workdir: str) -> None:
    """Validates the common fields, then creates ``workdir`` and records ``config.json``.

    Call it after the experiment's own validation, before any work: a workdir
    holding results of another config is refused with the fields that differ,
    so results of two configs are never mixed (the config of a run that stored
    no result yet, e.g. one stopped by a typo, is replaced with a warning), and
    the workdir is locked for the rest of this process (`wspace.io.workdir_lock`):
    a second run fails at once.
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
    ignored = {"progress", "tensorboard"}  # display/logging-only fields may change on reruns
    if old is not None:
        diff = {
            k: (old.get(k), new.get(k))
            for k in sorted(set(old) | set(new))
            if k not in ignored and old.get(k) != new.get(k)
        }
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        if diff and not _has_results(workdir):  # e.g. a typo that failed before any result
            msg = f"{workdir}: replacing the config of a run that stored no result ({lines})"
            warnings.warn(msg, stacklevel=2)
        elif diff:
            raise ValueError(
                f"{workdir} holds a run with another config ({lines}); "
                "use a new --workdir or delete this one"
            )
    write_json(path, new)


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


def run_arms(
    workdir: str, config, arm_fns: Mapping[str, Callable[[int], dict]]
) -> dict[str, list[dict]]:
    """Runs every arm for every seed of ``config``, caching each result; resumable.

    Args:
      workdir: the experiment's workdir (after `start`).
      config: the run's config (its ``seed``, ``num_seeds`` and ``progress``).
      arm_fns: arm name -> ``fn(seed) -> dict`` of JSON-able metrics.

    Returns:
      ``{arm: [result for each seed, in seed order]}``; each result is stored in
      ``workdir/arms/<arm>/seed_<s>.json`` and read back instead of rerun. In a
      multi-process run every process reads the stored results (a shared
      workdir) and runs the same missing ones; process 0 alone writes.
    """
    results: dict[str, list[dict]] = {}
    for arm, fn in arm_fns.items():
        results[arm] = []
        for seed in seeds(config):
            path = os.path.join(workdir, "arms", arm, f"seed_{seed}.json")
            if os.path.exists(path):
                result = read_json(path)
            else:
                if config.progress:
                    print(f"[{arm} seed {seed}]", file=sys.stderr, flush=True)
                result = dict(fn(seed))
                _check_finite_metrics(result, f"arm {arm!r} seed {seed}")
                if _is_writer():
                    write_json(path, result)
            results[arm].append(result)
    return results


def _check_finite_metrics(result: dict, where: str) -> None:
    """A run never reports NaN as a number: non-finite scalars are errors."""
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{where}: metric {k!r} is {v}")


# ----------------------------------------------------------------------------- statistics


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95):
    """Mean of ``a - b`` (paired by index) and its two-sided t confidence interval.

    Returns ``(mean, lo, hi)``; with one pair the interval is unbounded.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"need equally many paired values, got {len(a)} and {len(b)}")
    mean, half = float(d.mean()), _t_half_width(d, level)
    if math.isnan(half):
        return mean, -math.inf, math.inf
    return mean, mean - half, mean + half


def _t_half_width(values: np.ndarray, level: float = 0.95) -> float:
    """Half-width of the two-sided t interval of the mean of ``values`` (NaN for fewer than 2)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def verdict(lo: float, hi: float, *, higher_is_better: bool = True, margin: float = 0.0) -> str:
    """The verdict word an interval of ``arm - baseline`` supports.

    The claim is "arm is better than baseline" (``margin = 0``) or "arm is no
    worse than baseline by more than ``margin``". It ``holds`` when the whole
    interval lies on the claimed side of ``-margin`` (``+margin`` when lower is
    better), ``does not hold`` when it lies wholly on the other side, and is
    ``inconclusive`` otherwise.
    """
    if not higher_is_better:
        lo, hi = -hi, -lo
    if lo > -margin:
        return "holds"
    if hi < -margin:
        return "does not hold"
    return "inconclusive"


def _metric_values(results: list[dict], metric) -> list[float]:
    if callable(metric):
        return [float(metric(r)) for r in results]
    values = []
    for r in results:
        for part in metric.split("."):
            r = r[part]
        values.append(float(r))
    return values


def compare(
    claim: str,
    metric,
    arm: str,
    baseline: str,
    per_arm: Mapping[str, list[dict]],
    *,
    higher_is_better: bool = True,
    margin: float = 0.0,
    metric_name: str | None = None,
) -> dict:
    """One claim, "``arm`` beats ``baseline`` on ``metric``", judged over seeds.

    Args:
      claim: the claim in one sentence, as the paper makes it.
      metric: a key (dotted path) into each seed's result, or ``fn(result) -> float``.
      arm, baseline: arm names in ``per_arm`` (paired by seed).
      per_arm: what `run_arms` returned.
      higher_is_better: the direction of "better" for this metric.
      margin: for "no worse than" claims, the tolerated shortfall.
      metric_name: display name (default: ``metric`` when it is a string).

    Returns:
      a dict with the means, the paired difference and its 95% interval, and a verdict.
    """
    a, b = _metric_values(per_arm[arm], metric), _metric_values(per_arm[baseline], metric)
    mean, lo, hi = paired_interval(a, b)
    return {
        "claim": claim,
        "metric": metric_name or (metric if isinstance(metric, str) else "metric"),
        "arm": arm,
        "baseline": baseline,
        "n": len(a),
        "arm_mean": float(np.mean(a)),
        "baseline_mean": float(np.mean(b)),
        "diff_mean": mean,
        "ci95": [lo, hi],
        "higher_is_better": higher_is_better,
        "margin": margin,
        "verdict": verdict(lo, hi, higher_is_better=higher_is_better, margin=margin),
    }


def summarize(per_arm: Mapping[str, list[dict]], metrics: Sequence) -> dict:
    """A table of mean ± 95% half-width per arm (rows) and metric (columns)."""
    names = [m if isinstance(m, str) else getattr(m, "__name__", "metric") for m in metrics]
    rows = []
    for arm, results in per_arm.items():
        row: list[Any] = [arm]
        for m in metrics:
            v = np.asarray(_metric_values(results, m), np.float64)
            row.append([float(v.mean()), _t_half_width(v)])
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
    ``smoke`` (quick size: not a result), ``seeds``, ``claims`` (from `compare`),
    ``tables`` (from `summarize`), ``figures`` (PNG names in the workdir), ``notes``.
    """
    results = {
        "method": name,
        "size": config.size,
        "smoke": config.size == "quick",
        "dataset": config.dataset,
        "seeds": seeds(config),
        "claims": list(claims),
        "tables": dict(tables or {}),
        "figures": [os.path.basename(f) for f in figures],
        "notes": list(notes),
        **dict(extra or {}),
    }
    if _is_writer():
        write_json(os.path.join(workdir, "results.json"), results)
    return results


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


def format_number(x: float) -> str:
    """Compact: 0.973, 0.0051, 12.3, 5.1e-05."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–" if x is None else str(x)
    if x != 0 and (abs(x) < 1e-4 or abs(x) >= 1e4):
        return f"{x:.2e}"
    if abs(x) < 1e-2:
        return f"{x:.4f}"
    return f"{x:.3g}" if abs(x) >= 1 else f"{x:.3f}"


def claims_markdown(results: Mapping) -> str:
    """The claims of one results.json as a markdown table."""
    lines = [
        "| claim | metric | arm | baseline | difference (95% CI) | n | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["claims"]:
        lo, hi = c["ci95"]
        lines.append(
            f"| {c['claim']} | {c['metric']} | {format_number(c['arm_mean'])} "
            f"| {format_number(c['baseline_mean'])} | {format_number(c['diff_mean'])} "
            f"[{format_number(lo)}, {format_number(hi)}] | {c['n']} | **{c['verdict']}** |"
        )
    return "\n".join(lines)


def table_markdown(table: Mapping) -> str:
    """A `summarize`-style table (cells may be [mean, half-width] or scalars) as markdown."""
    cols = table["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table["rows"]:
        cells = []
        for v in row:
            if isinstance(v, list | tuple) and len(v) == 2:
                cells.append(f"{format_number(v[0])} ± {format_number(v[1])}")
            elif isinstance(v, float):
                cells.append(format_number(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def main(run_fn: Callable, name: str) -> None:
    """The absl entry point of ``experiments/<name>.py``.

    Flags: ``--workdir`` (default ``runs/<name>``) and ``--config`` (default
    ``experiments/configs/<name>.py:small``) with ``--config.field=value``
    overrides; the config is locked, so a misspelt field is an error naming it.
    ``--distributed`` calls `jax.distributed.initialize()` first (one process per
    host under Slurm, on a TPU pod slice, or with the ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` variables); use it with
    ``--config.mode=sharded`` so each process feeds its slice of every batch.
    Prints the claims table when the run ends.
    """
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", f"runs/{name}", "Output directory (resumes if it exists).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "configs", f"{name}.py:small"),
        "Config file, with :quick | :small | :paper for the size.",
    )

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        cfg = flags.FLAGS.config
        if flags.FLAGS.distributed:
            _initialize_distributed()
        results = run_fn(cfg, flags.FLAGS.workdir)
        print(f"\n{name} ({cfg.size} size, {len(results['seeds'])} seeds)")
        if results["smoke"]:
            print(f"[{SMOKE_STAMP}]")
        if results["claims"]:
            print(claims_markdown(results))
        print(f"results: {os.path.join(flags.FLAGS.workdir, 'results.json')}")

    app.run(_main)


def _initialize_distributed() -> None:
    """`jax.distributed.initialize`, from the cluster (Slurm, TPU pod) or the environment.

    Outside a cluster JAX detects, set ``JAX_COORDINATOR_ADDRESS`` (read by JAX),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here) for every process.
    """
    import jax

    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    jax.distributed.initialize(
        **{k: int(os.environ[v]) for k, v in names.items() if v in os.environ}
    )
