"""Argument checks shared by the invariant-path modules (ValueError before any work)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax


def check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    """Raises ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_number(name: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """Validates a hyperparameter when it is concrete (skipped for traced values)."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}") from None
    if not (v == v and ok(v)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
