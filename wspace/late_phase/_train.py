"""Late-phase training: the step body (compiled by `wspace.training.compile_step`) and `fit`.

Internals of `wspace.late_phase` (`LatePhase.make_train_step` and `LatePhase.fit`). The
step is the training step of `wspace.training.make_train_step` with the member read from
the optimizer wrapper's state first; it compiles through the one compile path of
training (jit | sharded | pmap, with or without a seed axis). `fit` runs both phases
through `wspace.training.fit`, which does all file writing.

Reference: von Oswald et al. 2021, arXiv 2007.12927.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace import data as ws_data
from wspace import training
from wspace.late_phase import _optimizer

if TYPE_CHECKING:  # the spec's class imports this module
    from wspace.late_phase import LatePhase

PyTree = Any


def step_body(
    spec: LatePhase, loss_fn: Callable, tx: optax.GradientTransformation, estimator: Callable
) -> Callable:
    """``body(state, batch, tx_args, axis_name=None) -> (state, metrics)`` of one late step."""
    opt = spec.optimizer(tx)
    parallel = spec.schedule == "parallel"
    loss = spec.parallel_loss(loss_fn) if parallel else spec.member_loss(loss_fn)

    def body(state, batch, tx_args, axis_name=None):
        key, sub = jax.random.split(state.key)
        member = spec.member_index(state.opt_state)
        if axis_name is not None:  # different noise per device, the same member
            sub = jax.random.fold_in(sub, jax.lax.axis_index(axis_name))
        fn = loss if parallel else functools.partial(_with_member, loss, member)
        grad_fn = estimator(fn, has_aux=True)
        (value, (model_state, metrics)), grads = grad_fn(
            state.params, state.model_state, batch, sub
        )
        metrics = {**metrics, "loss": jnp.mean(value)}
        if axis_name is not None:
            grads, model_state, metrics = jax.lax.pmean((grads, model_state, metrics), axis_name)
            if not parallel:  # rows of the other members bit for bit after the pmean
                rows = jax.tree.map(lambda _: True, model_state)
                model_state = _optimizer.keep_rows(
                    spec, model_state, state.model_state, rows, member, True
                )
        updates, opt_state = opt.update(grads, state.opt_state, state.params, **(tx_args or {}))
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),  # zero on held rows
            model_state=model_state,
            opt_state=opt_state,
            key=key,
        )
        return new_state, metrics

    return body


def _with_member(loss, member, params, model_state, batch, key):
    return loss(params, model_state, batch, key, member)


def fit(
    spec: LatePhase,
    state: training.TrainState,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    data: ws_data.Dataset | Iterable[dict],
    *,
    t0: int,
    num_steps: int,
    estimator: Callable,
    eval_fn: Callable | None,
    apply_fn: Callable | None,
    key: jax.Array | None,
    masks: PyTree | None,
    workdir: str | None,
    seed_loop: str,
    fit_kwargs: dict[str, Any],
) -> tuple[training.TrainState, list[dict]]:
    """`LatePhase.fit` (see there)."""
    if isinstance(t0, bool) or not isinstance(t0, int) or not 0 <= t0 <= num_steps:
        raise ValueError(f"t0 must be an int in [0, num_steps={num_steps}], got {t0!r}")
    batch_size = fit_kwargs.get("batch_size")
    if spec.schedule == "parallel" and batch_size and batch_size % spec.num_members:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by K={spec.num_members} "
            "under schedule='parallel'"
        )
    mode, mesh = fit_kwargs.get("mode", "jit"), fit_kwargs.get("mesh")
    if mode not in training.MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {training.MODES}")
    seed_axis = not isinstance(fit_kwargs.get("seed", 0), int | np.integer)
    warn_if_members_untrained(spec, num_steps - t0)
    if eval_fn is None and isinstance(data, ws_data.Dataset):
        if apply_fn is None:
            raise ValueError("fit on a Dataset needs apply_fn (default evaluation) or eval_fn")
        eval_fn = training.classification_eval(
            apply_fn, data, train_eval_examples=fit_kwargs.get("train_eval_examples", 1000),
            mode=mode, mesh=mesh, seed_axis=seed_axis,
        )  # fmt: skip
    sub = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
    steps = dict(
        estimator=estimator, mode=mode, mesh=mesh, seed_axis=seed_axis, seed_loop=seed_loop
    )
    history = []
    if t0 > 0:
        plain_step = training.make_train_step(loss_fn, tx, **steps)
        state, hist = training.fit(
            state, plain_step, data, num_steps=t0, eval_fn=eval_fn, workdir=sub("plain"),
            **fit_kwargs,
        )  # fmt: skip
        history += [{**r, "phase": "plain"} for r in hist]
    late_state = _expand(spec, state, tx, key, masks, seed_axis)
    if not isinstance(data, ws_data.Dataset) and iter(data) is data:  # one-shot: continue
        data = itertools.chain(itertools.repeat({}, int(np.ravel(state.step)[0])), data)
    average = jax.vmap(spec.average_state) if seed_axis else spec.average_state
    late_dir = sub("late")
    with warnings.catch_warnings():
        if late_dir and not os.path.exists(late_dir):  # a fresh late phase starts at t0
            warnings.filterwarnings("ignore", message=".*metrics.jsonl is missing")
        late_state, hist = training.fit(
            late_state,
            spec.make_train_step(loss_fn, tx, **steps),
            data,
            num_steps=num_steps,
            eval_fn=None if eval_fn is None else (lambda s: eval_fn(average(s))),
            workdir=late_dir,
            **{**fit_kwargs, "tx_args": _late_tx_args(spec, fit_kwargs.get("tx_args"))},
        )
    history += [{**r, "phase": "late"} for r in hist]
    return late_state, history


def warn_if_members_untrained(spec: LatePhase, late_steps: int) -> None:
    """Warns when the late phase has fewer steps than members (some would never train)."""
    if spec.schedule != "parallel" and late_steps < spec.num_members:
        warnings.warn(
            f"{late_steps} late-phase steps for K={spec.num_members} members: "
            f"{spec.num_members - late_steps} members are never trained (schedule "
            f"{spec.schedule!r}: one member per step); lengthen the late phase or lower K",
            stacklevel=3,
        )


def _expand(spec, state, tx, key, masks, seed_axis: bool):
    """`LatePhase.expand_state` at T0, per seed under a seed axis (masks shared or per seed)."""
    if not seed_axis:
        return spec.expand_state(state, tx, key=key, masks=masks)
    num_seeds = len(state.step)
    keys = None if key is None else jax.random.split(key, num_seeds)
    per_seed_masks = masks is not None and jnp.ndim(jax.tree.leaves(masks)[0]) == jnp.ndim(
        jax.tree.leaves(state.params)[0]
    )
    one = lambda s, k, m: spec.expand_state(s, tx, key=k, masks=m)
    axes = (0, None if keys is None else 0, 0 if per_seed_masks else None)
    return jax.vmap(one, in_axes=axes)(state, keys, masks)


def _late_tx_args(spec, tx_args):
    """``tx_args`` of the late phase: per-step ``masks`` laid out on the member axis."""

    def expand(args):
        if args and "masks" in args:
            return {**args, "masks": spec.expand_masks(args["masks"])}
        return args

    return (lambda batch: expand(tx_args(batch))) if callable(tx_args) else expand(tx_args)
