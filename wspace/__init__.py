"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.pruning.magnitude_masks(...)``.

Infrastructure: `data`, `models`, `training`, `io`, `paths`, `landscape`, `estimators`,
`averaging`. Methods (one module each): `late_phase`, `likelihood_ratio`,
`straight_through`, `pruning` and `lottery`, `invariant_path`.
"""

from wspace import (
    averaging,
    data,
    estimators,
    invariant_path,
    io,
    landscape,
    late_phase,
    likelihood_ratio,
    lottery,
    models,
    paths,
    pruning,
    straight_through,
    training,
)

__all__ = [
    "data",
    "models",
    "training",
    "io",
    "paths",
    "landscape",
    "estimators",
    "averaging",
    "pruning",
    "lottery",
    "late_phase",
    "likelihood_ratio",
    "straight_through",
    "invariant_path",
]
__version__ = "0.1.0"
