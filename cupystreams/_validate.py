"""Argument checks shared by the public entry points; each error names the argument."""

from __future__ import annotations

import math
import threading

__all__ = [
    "MAX_COUNT",
    "check_count",
    "check_flag",
    "check_int",
    "check_timeout",
    "check_wait",
]

# Far beyond any useful pool (a GPU has at most 32 hardware queues), small
# enough that a typo such as 10**9 fails at once instead of exhausting memory.
MAX_COUNT = 4096


def check_int(name: str, value: object, least: int, most: int | None = None) -> int:
    """An int in [least, most] (bools refused: ``True`` streams is a bug, not 1)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if most is not None and not least <= value <= most:
        raise ValueError(f"{name}={value} must be in [{least}, {most}]")
    if value < least:
        raise ValueError(f"{name}={value} must be >= {least}")
    return value


def check_count(name: str, value: object) -> int:
    """A count of streams or events: an int in [0, MAX_COUNT]."""
    return check_int(name, value, 0, MAX_COUNT)


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
    # Beyond what a lock can wait for, a timeout means "for ever".
    return None if timeout >= threading.TIMEOUT_MAX else float(timeout)


def check_wait(blocking: object, timeout: object) -> float | None:
    """The ``blocking`` / ``timeout`` pair of an acquire: seconds to wait at most, or None.

    ``timeout`` with ``blocking=False`` is refused rather than ignored: the
    caller meant one of the two.
    """
    check_flag("blocking", blocking)
    seconds = check_timeout(timeout)
    if timeout is not None and blocking is False:
        raise ValueError(
            f"timeout={timeout!r} has no effect with blocking=False (which never waits); "
            "pass blocking=True with the timeout, or drop the timeout"
        )
    return seconds
