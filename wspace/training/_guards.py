"""What `wspace.training.fit` refuses: bad arguments, and non-finite losses or states.

Bad arguments raise ValueError before any work or file write; a non-finite loss or
state stops the run with FloatingPointError naming the step and how to start over.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from wspace import data as data_lib
from wspace.training._state import TrainState, _check_seeds, _is_int


def _validate_fit(state, data, num_steps, batch_size, eval_every, ckpt_every, train_eval) -> None:
    """Bad arguments of `fit` -> ValueError before any work or file write."""
    for name, value, optional in (
        ("num_steps", num_steps, False),
        ("eval_every", eval_every, False),
        ("checkpoint_every", ckpt_every, True),
        ("batch_size", batch_size, True),
    ):
        if not (optional and value is None) and not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if train_eval is not None and not (_is_int(train_eval) and train_eval >= 0):
        raise ValueError(f"train_eval_examples must be an int >= 0 or None, got {train_eval!r}")
    if isinstance(data, data_lib.Dataset):
        if batch_size is None:
            raise ValueError("fit on a Dataset needs batch_size")
    elif not isinstance(data, Iterable):
        raise ValueError(
            f"data must be a wspace.data.Dataset or an iterable of batches, got {type(data)}"
        )
    at = int(np.max(state.step))
    if at > num_steps:
        raise ValueError(f"state is at step {at}, beyond num_steps={num_steps}")


def _check_callables(**fns) -> None:
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
    if fns["train_step"] is None:
        raise ValueError("train_step must be callable (from make_train_step), got None")


def _check_fit_seed(seed, seed_axis: bool, state: TrainState):
    """``seed`` as fit uses it: an int, or (for a seed-axis step) the list of seeds."""
    if not seed_axis:
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r} (a list needs seed_axis=True)")
        return int(seed)
    seeds = _check_seeds(seed)
    if np.ndim(state.step) != 1 or len(state.step) != len(seeds):
        raise ValueError(
            f"a seed-axis step needs a state with a leading axis of {len(seeds)} seeds "
            f"(from init_states), got step of shape {np.shape(state.step)}"
        )
    if len(set(np.asarray(state.step).tolist())) != 1:
        raise ValueError(f"the seeds' states are at different steps: {state.step}")
    return seeds


def _check_finite(pending, sums: dict, last_good, ckpt, seed_axis: bool = False) -> None:
    """Raises on the first non-finite loss in ``pending`` (host ``[(step, metrics)]``).

    Adds the metrics to ``sums``: per seed with a seed axis, else averaged (pmap's
    per-device copies are equal).
    """
    for step, metrics in pending:
        loss = np.asarray(metrics["loss"], np.float64)
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss {loss.ravel()[0]} at step {step}; stopped "
                f"({_last_good_text(last_good, ckpt)}). Lower the learning rate or check "
                "the inputs."
            )
        for k, v in metrics.items():
            s, c = sums.get(k, (0.0, 0))
            v = np.asarray(v, np.float64) if seed_axis else float(np.mean(v))
            sums[k] = (s + v, c + 1)


def _last_good_text(last_good, ckpt) -> str:
    """Where a stopped run can restart from.

    A checkpoint is only saved of a finite state, but finite is not healthy: one saved
    while the loss was already exploding (lr 1e6: params at 1e11) fails again when
    resumed, even with a lower learning rate. So the advice is to start over, which works
    for every cause (the workdir's identity is then replaced with a warning).
    """
    if ckpt is None:
        return "no workdir, so no checkpoints"
    if last_good is None:
        return "there is no good checkpoint"
    return (
        f"the newest checkpoint, step {last_good}, is finite but may already be diverging; "
        f"to start over, delete {ckpt.directory} or use a new workdir"
    )


@jax.jit
def _all_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves((state.params, state.model_state, state.opt_state))
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)
