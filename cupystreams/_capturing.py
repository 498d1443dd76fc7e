"""Which devices have a CUDA graph capture in progress, so that nothing breaks it.

Creating or destroying a stream or an event while a device is capturing can
break the capture: destroying a stream may synchronize the device, and a
capture in CUDA's global mode (``torch.cuda.graph``'s default) turns such
calls into errors that invalidate it. So while ``pool.capture()`` runs on a
device (from its start until the capture has really ended, see
``cupystreams._capture``), the library creates and destroys neither there:
event pools hand out idle events only, and creating or closing a pool is
refused with an error that says to do it before or after the capture.

A check alone would race: a pool that finds no capture in progress could
destroy its streams just after another thread began one. So the code that
creates or destroys runs in a section (``outside``, ``unless_capturing``)
that a capture's ``begin`` waits for: the section is refused, or skipped,
if a capture is in progress when it starts, and no capture of its device
begins until it ends. Sections never wait, so they cannot deadlock with a
capture; a ``begin`` waits at most as long as a section runs (closing a
pool waits for its streams' work).

Locking: ``_changed`` guards ``_captures`` (captures in progress per device)
and ``_sections`` (sections in progress per device; device None: any). It
is a leaf: nothing else is taken while it is held. It is reentrant, and the
dicts are read from snapshots, because a dropped pool's finalizer (which
frees events in a section) may run inside any allocation, here too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._errors import PoolError

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["begin", "end", "outside", "unless_capturing"]

_Key = tuple[str, int | None]

_changed = threading.Condition(threading.RLock())
_captures: dict[tuple[str, int], int] = {}
_sections: dict[_Key, int] = {}


def begin(backend: Backend) -> None:
    """Count one more capture in progress on ``backend``'s device, once no section
    that creates or destroys there runs."""
    key = (backend.name, backend.device)
    with _changed:
        _changed.wait_for(lambda: not _in_section(*key))
        _captures[key] = _captures.get(key, 0) + 1


def end(backend: Backend) -> None:
    """Undo one ``begin``."""
    with _changed:
        _count_down(_captures, (backend.name, backend.device))


@contextlib.contextmanager
def unless_capturing(name: str, device: int | None) -> Iterator[bool]:
    """A section that may create or destroy streams and events on ``device``.

    Yields False, and holds nothing off, if a capture of the device (of any
    device of the named backend, for None) is in progress; else True, and no
    capture of it begins until the block ends.
    """
    key: _Key = (name, device)
    clear = not _enter(key)
    try:
        yield clear
    finally:
        if clear:
            _leave(key)


@contextlib.contextmanager
def outside(name: str, device: int | None, doing: str, fix: str) -> Iterator[None]:
    """A section as ``unless_capturing``'s, refused during a capture.

    Raises:
        PoolError: A capture of the device is in progress; the message says
            that ``doing`` ("creating a CudaStreamPool") could break it, and
            ``fix`` how to do it without.
    """
    key: _Key = (name, device)
    if busy := _enter(key):
        raise _refusal(name, busy[0], doing, fix)
    try:
        yield
    finally:
        _leave(key)


def _refusal(name: str, device: int, doing: str, fix: str) -> PoolError:
    return PoolError(
        f"a CUDA graph capture of device {device} ({name} backend) is in progress "
        f"(pool.capture()); {doing} now could break it: {fix}"
    )


def _enter(key: _Key) -> list[int]:
    """Start a section unless a capture is in progress: the devices capturing (none: started)."""
    with _changed:
        busy = _capturing(*key)
        if not busy:
            _sections[key] = _sections.get(key, 0) + 1
    return busy


def _leave(key: _Key) -> None:
    with _changed:
        _count_down(_sections, key)
        _changed.notify_all()  # a capture's begin may wait for this


def _count_down(counts: dict[Any, int], key: Any) -> None:
    """One fewer of ``key`` in ``counts``; none left, no entry."""
    if left := counts[key] - 1:
        counts[key] = left
    else:
        del counts[key]


def _capturing(name: str, device: int | None) -> list[int]:
    """The named backend's devices (``device``, or any for None) with a capture in progress."""
    return sorted(d for n, d in list(_captures) if n == name and device in (None, d))


def _in_section(name: str, device: int) -> bool:
    return any(n == name and d in (None, device) for n, d in list(_sections))


def _forget_after_fork() -> None:
    global _changed
    _changed = threading.Condition(threading.RLock())  # a parent thread may have held it
    _captures.clear()  # the parent's captures do not exist in the child
    _sections.clear()  # nor its sections


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
