"""The error hierarchy: one class per thing that can go wrong with a pool."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "LeaseError",
    "PoolClosedError",
    "PoolError",
    "PoolExhaustedError",
    "PoolTimeoutError",
]


class PoolError(RuntimeError):
    """Base class of every error a pool raises about its own state."""


class PoolClosedError(PoolError):
    """The pool was closed (or inherited through ``fork``) and serves nothing."""


class PoolExhaustedError(PoolError):
    """A non-blocking acquire found no idle stream of the requested kind."""


class PoolTimeoutError(PoolError, TimeoutError):
    """A blocking acquire waited ``timeout`` seconds without getting a stream."""


class LeaseError(PoolError):
    """A lease was misused: used after release, released twice, or released
    to a pool that did not issue it."""


class BackendUnavailableError(PoolError):
    """The requested backend cannot run here; the message says why and how to
    opt into another one."""
