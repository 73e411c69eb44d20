"""Where arrays live in each mode: `place_state`, `place_batch`, `unplace_state`.

`MODES` and `default_mesh` name the modes (see `wspace.training`); `_addressable` and
`_global_array` move trees between host values and global (multi-host) arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace.training._state import TrainState

PyTree = Any


MODES = ("jit", "sharded", "pmap")


def default_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over all devices (of all processes)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def place_state(
    state: TrainState,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    seed_axis: bool = False,
) -> TrainState:
    """Puts a host state where a step of ``mode`` expects it.

    ``sharded``: replicated; with ``seed_axis``, split along the leading seed axis when
    the number of seeds divides by the number of devices (else replicated, and batches
    are split along their batch axis instead); ``pmap``: replicated with a leading device
    axis; ``jit``: unchanged.
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
        sharding = _state_sharding(mode, mesh, seed_axis, state)
        return _global_array(state, sharding) if seed_axis else jax.device_put(state, sharding)
    if mode == "pmap":
        devices = jax.local_devices()
        sharding = NamedSharding(jax.sharding.Mesh(devices, ("batch",)), P("batch"))
        stacked = jax.tree.map(lambda x: np.broadcast_to(x, (len(devices),) + x.shape), state)
        return jax.device_put(stacked, sharding)
    return state


def _state_sharding(mode: str, mesh, seed_axis: bool, state: TrainState):
    """Where `place_state` puts ``state`` (None outside ``sharded`` mode)."""
    if mode != "sharded":
        return None
    split = seed_axis and len(state.step) % mesh.size == 0
    return NamedSharding(mesh, P("data") if split else P())


def unplace_state(state: TrainState, mode: str) -> TrainState:
    """The inverse of `place_state`: one copy of the state (the first device's under pmap)."""
    if mode == "pmap":
        return jax.tree.map(lambda x: x[0], state)
    return state


def place_batch(
    batch: dict,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    seed_axis: bool = False,
    stacked: bool = False,
) -> dict:
    """Puts this process's batch where a step of ``mode`` expects it.

    ``sharded``: a global array split along ``data``: along the batch axis (each process
    passes its local slice, as `wspace.data.batches` yields with ``process_index``), or,
    with ``seed_axis``, along the seed axis as `place_state` splits the state (every
    process passes the whole batch of every seed); ``stacked``: batches for
    `TrainStep.scan`, with a leading step axis.
    ``pmap``: reshaped to ``(local_devices, B / local_devices, ...)``.
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
        lead = (None,) if stacked else ()
        if not seed_axis:
            sharding = NamedSharding(mesh, P(*lead, "data"))
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x), batch
            )
        num_seeds = np.shape(jax.tree.leaves(batch)[0])[len(lead)]
        spec = (*lead, "data") if num_seeds % mesh.size == 0 else (*lead, None, "data")
        return _global_array(batch, NamedSharding(mesh, P(*spec)))
    if mode == "pmap":
        n = jax.local_device_count()
        if len(batch["x"]) % n:
            raise ValueError(f"batch of {len(batch['x'])} does not split over {n} devices")
        return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    return batch


def _addressable(tree: PyTree) -> PyTree:
    """``tree`` with arrays split over other hosts gathered, so every process can read them."""

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(gather, tree)


def _global_array(tree: PyTree, sharding) -> PyTree:
    """A tree of global arrays from host values every process holds in full."""

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)
