"""What ULR and ES share: the copy options, baselines, and the reduction over copies.

Both estimators evaluate the loss on N noisy copies and weight each copy's
noise score by its centred loss ``L_n - b_n``; this module validates the
options that describe the copies and computes those weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wspace.likelihood_ratio._noise import check_noise, num_pairs

BASELINES = ("none", "clean", "mean")


def _check_sigma(sigma) -> None:
    values = sigma.values() if isinstance(sigma, Mapping) else [sigma]
    for s in values:
        if isinstance(s, jax.core.Tracer):
            continue
        ok = isinstance(s, int | float | np.number) or (hasattr(s, "ndim") and s.ndim == 0)
        if not ok or not (np.isfinite(float(s)) and float(s) > 0):
            raise ValueError(
                f"sigma must be a finite float > 0 (or a mapping of layer paths to such "
                f"floats), got {s!r}"
            )


def validate(
    num_copies: int,
    sigma: float | Mapping[str, float],
    noise: str,
    antithetic: bool,
    baseline: str,
    qmc: bool = False,
) -> None:
    """Raise ValueError for copy options that no estimator accepts (before any work)."""
    is_int = isinstance(num_copies, int | np.integer) and not isinstance(num_copies, bool)
    if not is_int or num_copies < 1:
        raise ValueError(f"num_copies must be an integer >= 1, got {num_copies!r}")
    _check_sigma(sigma)
    check_noise(noise)
    if antithetic and num_copies % 2:
        raise ValueError(f"antithetic pairs need an even num_copies, got {num_copies}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "mean" and num_pairs(num_copies, antithetic) < 2:
        raise ValueError(
            f"baseline='mean' (leave-one-out) needs at least 2 independent "
            f"{'pairs' if antithetic else 'copies'}, got num_copies={num_copies}"
        )
    if baseline == "mean" and qmc:
        raise ValueError(
            "baseline='mean' with qmc=True is biased (QMC copies are dependent); "
            "use baseline='clean' or 'none'"
        )


def check_options(cls, options: dict) -> None:
    """ValueError naming the unknown options of estimator class ``cls`` (a dataclass)."""
    allowed = cls.__dataclass_fields__
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {unknown}; allowed: {list(allowed)}")


def forward_evaluations(*, num_copies: int, baseline: str = "none", recompute: bool = False) -> int:
    """Forward evaluations per example of one ULR/ES gradient: ``N (x2 recompute) (+1 clean)``.

    A clean baseline runs one extra noise-free pass (N + 1); ``recompute``
    (ULR only) runs the N noisy passes twice.
    """
    return num_copies * (2 if recompute else 1) + (baseline == "clean")


def split_loss(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
    """``(loss, aux)`` from ``loss_fn``'s output (``aux`` None without ``has_aux``)."""
    return out if has_aux else (out, None)


def reduce_copies(tree: Any) -> Any:
    """Mean over the leading copy axis for float leaves; the first copy for the others."""
    return jax.tree.map(
        lambda a: jnp.mean(a, 0) if jnp.issubdtype(a.dtype, jnp.inexact) else a[0], tree
    )


def weights(losses: jax.Array, clean_loss: jax.Array | None, cfg: Any) -> jax.Array:
    """``(L_n - b_n) / B`` per copy (and example): the factor of psi(e) in each cotangent.

    Args:
      losses: ``(N,)`` per-copy losses or ``(N, B)`` per-example losses, copy-major
        (with antithetic pairs copy ``n + N/2`` is the partner of copy ``n``).
      clean_loss: the noise-free loss (``baseline="clean"``), else None.
      cfg: the estimator (its ``num_copies``, ``antithetic``, ``baseline``).

    Returns:
      The weights, shape of ``losses``, without gradient.
    """
    n = cfg.num_copies
    if cfg.baseline == "clean":
        b = jnp.broadcast_to(clean_loss, losses.shape[1:])  # type: ignore[arg-type]  # clean: set
        centred = losses - b
    elif cfg.baseline == "mean":
        if cfg.antithetic:  # leave out the whole pair: the partner shares the noise
            half = n // 2
            pair_sum = losses[:half] + losses[half:]
            loo = (jnp.sum(pair_sum, 0) - pair_sum) / (2 * (half - 1))
            centred = losses - jnp.concatenate([loo, loo])
        else:
            loo = (jnp.sum(losses, 0) - losses) / (n - 1)
            centred = losses - loo
    else:
        centred = losses
    if losses.ndim == 2:  # per-example: the target is the batch mean
        centred = centred / losses.shape[1]
    return jax.lax.stop_gradient(centred)
