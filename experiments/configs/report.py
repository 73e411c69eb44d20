"""Config of `experiments.report`: which methods, at which size."""

import ml_collections

from experiments.configs.base import SIZES


def get_config(arg: str = "small"):
    """``arg`` is the size every method runs at: quick (smoke), small (`make demo`), paper."""
    if arg not in SIZES:
        raise ValueError(f"unknown report size {arg!r}; use one of {SIZES}")
    return ml_collections.ConfigDict(
        {
            "size": arg,
            # comma-separated experiment names, in report order
            "methods": ",".join(
                ["late_phase", "likelihood_ratio", "straight_through", "lottery"]
                + ["invariant_path", "compose"]
            ),
            "progress": False,
            # every method's first seed (its config.seed): another value replicates the
            # report on fresh seeds (seed, ..., seed + num_seeds - 1)
            "seed": 0,
            # methods run at once, each in its own process (1: in this process, in turn);
            # two processes on 2 cores: ULR + ST took 105 s side by side, 135 s in turn
            "jobs": 1 if arg == "quick" else 2,
        }
    )
