"""What every experiment shares: the workdir layout, JSON/JSONL files, plots.

An experiment writes into ``--workdir``: ``config.json`` (its flags),
``metrics.jsonl`` (one line per evaluation), ``results.json`` (the headline
table) and PNG plots. All JSON is written atomically, so a killed run never
leaves half a file; `load_json` and `done` let a rerun skip finished work.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from wspace.data import atomic_open
from wspace.training import write_json


def define_common_flags(default_workdir: str) -> None:
    """Flags shared by all experiments: workdir, dataset, seed, quick."""
    flags.DEFINE_string("workdir", default_workdir, "Output directory (resumes if it exists).")
    flags.DEFINE_string("dataset", "mnist1d", "mnist1d | digits | npz:PATH | a TFDS name.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir, for TFDS datasets.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_bool("quick", False, "Tiny sizes that finish in seconds (smoke tests).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")


def start(workdir: str, config: dict) -> None:
    """Creates ``workdir`` and writes ``config.json``.

    A rerun with a different config in the same workdir would silently mix
    results, so it is refused.
    """
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    old = load_json(path)
    if old is not None and old != json.loads(json.dumps(config)):
        raise ValueError(
            f"{workdir} holds a run with another config; use a new --workdir.\n"
            f"  old: {old}\n  new: {config}"
        )
    write_json(path, config)


def load_json(path: str):
    """The parsed file, or None if it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_results(workdir: str, results: dict, name: str = "results.json") -> str:
    """Writes the headline results atomically; returns the path."""
    path = os.path.join(workdir, name)
    write_json(path, results)
    return path


def savefig(fig, workdir: str, name: str) -> str:
    """Saves a matplotlib figure as PNG in ``workdir`` (atomically) and closes it."""
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, name)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
