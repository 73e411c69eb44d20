"""Which weights: leaf names, label and selection pytrees, per-layer values by name prefix.

One vocabulary for every method that treats some weights differently (pruning's
``exclude`` and ``layer_sparsity``, lottery's per-layer rates, the latent weights of
binary layers). A leaf is named by its pytree path joined with ``"/"``, e.g.
``"Dense_0/kernel"``, ``"BatchNorm_0/scale"`` or ``"head/bias"`` (dict keys,
attribute names and sequence indices, as `jax.tree_util.tree_flatten_with_path`
yields them). A choice of weights is a function ``fn(name, leaf)``; applied to a
tree it gives a pytree of labels (for ``optax.multi_transform``) or of bools (for
``optax.masked``), shaped like the params.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any
KeyPath = tuple[Any, ...]  # a pytree key path, as `jax.tree_util.tree_flatten_with_path` gives


def path_names(keypath: KeyPath) -> tuple[str, ...]:
    """The names along a pytree key path, e.g. ``("BatchNorm_0", "scale")``."""
    names = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def path_name(keypath: KeyPath) -> str:
    """The ``"/"``-joined name of a pytree key path, e.g. ``"Dense_0/kernel"``."""
    return "/".join(path_names(keypath))


def named_leaves(tree: PyTree) -> tuple[list[str], list, Any]:
    """``(names, leaves, treedef)`` of a pytree, names as in `path_name`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_name(p) for p, _ in flat], [x for _, x in flat], treedef


def leaves_by_name(tree: PyTree) -> dict[str, Any]:
    """The leaves of ``tree`` keyed by their names (as in `path_name`), e.g. to look a leaf
    of one tree up while walking another shaped alike (the plain and an expanded layout)."""
    names, leaves, _ = named_leaves(tree)
    return dict(zip(names, leaves, strict=True))


def label_tree(tree: PyTree, fn: Callable[[str, Any], Any]) -> PyTree:
    """The pytree of ``fn(name, leaf)`` for every leaf: labels shaped like ``tree``.

    E.g. ``label_tree(params, lambda n, x: "late" if n.startswith("head/") else "shared")``
    for ``optax.multi_transform``. Labels must not be None (None is an empty pytree).
    """
    _check_callable(fn)
    names, leaves, treedef = named_leaves(tree)
    return jax.tree.unflatten(treedef, [fn(n, x) for n, x in zip(names, leaves, strict=True)])


def select(tree: PyTree, predicate: Callable[[str, Any], bool]) -> PyTree:
    """The bool pytree of ``predicate(name, leaf)`` (e.g. for ``optax.masked``)."""
    _check_callable(predicate)
    return label_tree(tree, lambda n, x: bool(predicate(n, x)))


def by_prefix(mapping: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """The value of the longest key of ``mapping`` that is ``name`` or a ``"/"``-prefix of it.

    ``by_prefix({"head": 0.1}, "head/kernel") == 0.1``; ``"Dense_1"`` matches
    ``"Dense_1/kernel"`` but not ``"Dense_10/kernel"``. ``default`` when no key matches.
    """
    best = None
    for key in mapping:
        if (name == key or name.startswith(key + "/")) and (best is None or len(key) > len(best)):
            best = key
    return default if best is None else mapping[best]


def _check_callable(fn) -> None:
    if not callable(fn):
        raise ValueError(f"expected a callable fn(name, leaf), got {fn!r}")
