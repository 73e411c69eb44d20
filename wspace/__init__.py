"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.pruning.magnitude_masks(...)``.

Infrastructure: `data`, `models`, `training`, `io`, `paths`, `landscape`, `estimators`,
`averaging`, `stats`. Methods (one module each): `late_phase`, `likelihood_ratio`,
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
    stats,
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
    "stats",
    "pruning",
    "lottery",
    "late_phase",
    "likelihood_ratio",
    "straight_through",
    "invariant_path",
]
__version__ = "0.1.0"


def _namedtuple_constructors_in_their_module() -> None:
    """Gives each public NamedTuple's generated ``__new__`` its class's module.

    `collections.namedtuple` compiles ``__new__`` in a synthetic module
    (``namedtuple_<Name>``), so tools that resolve its string annotations in the function's
    module (pdoc, for the API reference) cannot find names such as ``PyTree``.
    """
    for module in __all__:
        for obj in vars(globals()[module]).values():
            if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
                obj.__new__.__module__ = obj.__module__


_namedtuple_constructors_in_their_module()
