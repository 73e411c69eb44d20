"""Compiling late-phase steps: jit | sharded | pmap, cached per (loss, tx, config), and SWA
inside a late-phase ``tx``. Internals of `wspace.late_phase`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from wspace import averaging, training


def _swa_of(new, old, new_params):
    """Redoes every `wspace.averaging.swa` mean in ``new`` on the params actually reached.

    Inside ``tx``, SWA saw ``params + updates`` before the inactive members' rows and the
    held shared weights were reset; its ``n`` (iterates averaged) is right, so the mean
    is ``old.mean + [n grew] (new_params - old.mean) / n``.
    """
    is_swa = lambda x: isinstance(x, averaging.SWAState)

    def fix(n, o):
        if not is_swa(n):
            return n
        w = jnp.where(n.n > o.n, 1.0 / jnp.maximum(n.n, 1), 0.0)
        mean = jax.tree.map(
            lambda m, p: (m + w.astype(m.dtype) * (p - m)).astype(m.dtype), o.mean, new_params
        )
        return n._replace(mean=mean)

    return jax.tree.map(fix, new, old, is_leaf=is_swa)


@functools.lru_cache(maxsize=16)
def _plain_step(loss_fn, tx, mode: str, mesh) -> Callable:
    return training.make_train_step(loss_fn, tx, mode=mode, mesh=mesh)


@functools.lru_cache(maxsize=16)
def _late_step(cfg, loss_fn, tx, mode: str, mesh, shard: bool) -> Callable:
    return cfg.make_train_step(loss_fn, tx, mode=mode, mesh=mesh, shard_members=shard)


def _steps(cfg, loss_fn, tx, mode: str, mesh, shard: bool) -> tuple[Callable, ...]:
    """The plain and late-phase steps of `LatePhase.fit`, built once per (loss, tx[, config])
    so that repeated runs (seeds, arms) reuse the compiled steps; uncached when unhashable."""
    try:
        hash((cfg, loss_fn, tx, mesh))
    except TypeError:
        return _plain_step.__wrapped__(loss_fn, tx, mode, mesh), _late_step.__wrapped__(
            cfg, loss_fn, tx, mode, mesh, shard
        )
    return _plain_step(loss_fn, tx, mode, mesh), _late_step(cfg, loss_fn, tx, mode, mesh, shard)


def _with_member(loss, member, params, model_state, batch, key):
    return loss(params, model_state, batch, key, member)
