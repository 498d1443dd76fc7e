"""Argument checks shared by the public entry points; each error names the argument."""

from __future__ import annotations

import math

__all__ = ["check_count", "check_flag", "check_timeout"]


def check_count(name: str, value: object) -> int:
    """A non-negative int (bools refused: ``True`` streams is a bug, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool")
    return value


def check_timeout(timeout: object) -> float | None:
    """Seconds >= 0, or None (and infinity) for no limit."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout={timeout!r} must be a number of seconds or None")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout={timeout!r} must be >= 0 seconds, or None to wait for ever")
    return None if math.isinf(timeout) else float(timeout)
