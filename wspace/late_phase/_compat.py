"""Old names of `wspace.late_phase` (one release, each with a DeprecationWarning).

The first API repeated ``select=`` in every function and knew only the parallel
schedule (`LatePhase(schedule="parallel")`); SWA moved to `wspace.averaging`.
"""

from __future__ import annotations

import warnings

from wspace import averaging
from wspace.late_phase import LatePhase


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"wspace.late_phase.{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=4,
    )


def _par(select="bn_head", num_members=1, combine="mean", noise=0.0, eps=1e-5) -> LatePhase:
    return LatePhase(num_members, select, "parallel", combine, noise, eps)


def _old_expand_state(
    state, tx, select, num_members, *, key=None, noise=0.0, reset_opt_state=False
):
    late = _par(select, num_members, noise=noise)  # returns tx's state unwrapped (parallel)
    p = late.expand(state.params, key=key)
    opt = (
        tx.init(p)
        if reset_opt_state
        else late.expand_opt_state(tx, state.opt_state, state.params, p)
    )
    return state.replace(
        params=p, model_state=late.expand_model_state(state.model_state), opt_state=opt
    )


# Old names (one release): the functions of the first API, each with ``select=`` in its signature,
# and the parallel schedule of `late_phase_loss` as the only one.
_OLD = {
    "member_axes": lambda t, select="bn_head": _par(select).member_axes(t),
    "expand": lambda p, select, k, *, key=None, noise=0.0: _par(select, k, noise=noise).expand(
        p, key=key
    ),
    "expand_model_state": lambda s, k: LatePhase(k).expand_model_state(s),
    "expand_opt_state": lambda tx, o, p, lp_, select="bn_head", *, reset=False: (
        tx.init(lp_) if reset else _par(select).expand_opt_state(tx, o, p, lp_)
    ),
    "expand_state": _old_expand_state,
    "member": lambda p, s, k, select="bn_head": _par(select).member(p, s, k),
    "late_phase_loss": lambda f, k, select="bn_head", *, combine="mean": _par(
        select, k, combine
    ).parallel_loss(f),
    "average": lambda p, s, select="bn_head", *, eps=1e-5: _par(select, eps=eps).average(p, s),
    "averaged_apply": lambda f, select="bn_head", *, eps=1e-5: _par(select, eps=eps).averaged_apply(
        f
    ),
    "num_late_phase_params": lambda t, select="bn_head": _par(select).num_late_phase_params(t),
}
_MOVED = ("swa", "swa_params", "recompute_batch_stats", "SWAState")  # to wspace.averaging


def resolve(name: str):
    """The object behind an old name, with a DeprecationWarning; AttributeError otherwise."""
    if name in _OLD:
        new = "make_train_step" if name == "late_phase_loss" else name
        _deprecated(name, f"LatePhase(num_members, select, ...).{new}")
        return _OLD[name]
    if name in _MOVED:
        _deprecated(name, f"wspace.averaging.{name}")
        return getattr(averaging, name)
    raise AttributeError(f"module 'wspace.late_phase' has no attribute {name!r}")
