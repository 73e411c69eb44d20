"""The fields every experiment config has; light (imports no JAX), so configs load fast."""

from __future__ import annotations

import ml_collections

SIZES = ("quick", "small", "paper")
NUM_SEEDS = {"quick": 2, "small": 10, "paper": 10}
DISPLAY_ONLY = ("progress", "tensorboard")  # fields that never change a run's results


def base_config(size: str) -> ml_collections.ConfigDict:
    """The fields every experiment has; ``size`` is quick | small | paper.

    Fields: ``size``, ``dataset`` (mnist1d | digits | npz:PATH | a TFDS name),
    ``data_dir`` ("" for none), ``seed`` (the first seed), ``num_seeds``,
    ``mode`` (jit | sharded | pmap), ``progress`` (tqdm bars), ``tensorboard``
    (also write TensorBoard logs: each arm under
    ``<workdir>/train/<arm>/seeds_<a>-<b>/tb``, `metric_writer`).
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
