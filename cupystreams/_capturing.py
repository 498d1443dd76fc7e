"""Which devices have a CUDA graph capture in progress, so that nothing breaks it.

Creating or destroying a stream or an event while a device is capturing can
break the capture: destroying a stream may synchronize the device, and a
capture in CUDA's global mode (``torch.cuda.graph``'s default) turns such
calls into errors that invalidate it. So while ``pool.capture()`` runs on a
device (from its start until the capture has really ended, see
``cupystreams._capture``), the library creates and destroys neither there:
event pools hand out idle events only, and creating or closing a pool is
refused with an error that says to do it before or after the capture.

Locking: ``_lock`` guards ``_captures`` (captures in progress per device).
It is a leaf: nothing else is taken while it is held.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from ._errors import PoolError

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["begin", "end", "in_progress", "refuse"]

_lock = threading.Lock()
_captures: dict[tuple[str, int], int] = {}


def begin(backend: Backend) -> None:
    """Count one more capture in progress on ``backend``'s device."""
    key = (backend.name, backend.device)
    with _lock:
        _captures[key] = _captures.get(key, 0) + 1


def end(backend: Backend) -> None:
    """Undo one ``begin``."""
    key = (backend.name, backend.device)
    with _lock:
        left = _captures[key] - 1
        if left:
            _captures[key] = left
        else:
            del _captures[key]


def in_progress(backend: Backend) -> bool:
    """True while a capture of ``backend``'s device is in progress."""
    with _lock:
        return (backend.name, backend.device) in _captures


def refuse(name: str, device: int | None, doing: str, fix: str) -> None:
    """Raise ``PoolError`` if a capture is in progress on ``device`` of the named backend.

    Args:
        name: The backend's name (``"cupy"``, ``"host"``).
        device: The device; None for any (a pool for the current device, whose
            backend is not made yet: making one calls the driver).
        doing: What the caller was about to do ("creating a CudaStreamPool").
        fix: How to do it without breaking the capture.
    """
    with _lock:
        busy = sorted(d for n, d in _captures if n == name and device in (None, d))
    if busy:
        raise PoolError(
            f"a CUDA graph capture of device {busy[0]} ({name} backend) is in progress "
            f"(pool.capture()); {doing} now could break it: {fix}"
        )


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at fork
    _captures.clear()  # the parent's captures do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
