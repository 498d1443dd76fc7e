"""Which devices have a CUDA graph capture in progress, so that nothing breaks it.

Creating or destroying a stream or an event while a device is capturing can
break the capture: destroying a stream may synchronize the device, and a
capture in CUDA's global mode (``torch.cuda.graph``'s default) turns such
calls into errors that invalidate it. So while ``pool.capture()`` runs on a
device (from its start until the capture has really ended, see
``cupystreams._capture``), the library creates and destroys neither there:
creating or closing a pool is refused with an error that says to do it
before or after the capture, event pools hand out idle events only, and
what must be destroyed meanwhile (a dropped pool's streams, a used event)
is destroyed once the device's last capture has ended (``dispose``).

A check alone would race: a pool that finds no capture in progress could
destroy its streams just after another thread began one. So the calls that
create or destroy run in a *section* (``outside``, ``unless_capturing``,
``dispose``), which is refused, skipped or deferred if a capture of the
device is in progress when it starts, and which a capture's ``begin``
waits for. A section holds only such calls, never a wait for queued work or
for users' code (a pool drains its streams before it destroys them), so a
``begin`` waits briefly, and nothing in a section waits for a capture.

Locking: ``_lock`` guards ``_captures``, ``_capturing_of``, ``_sections``
and ``_deferred``. It is a leaf, and held only over dict operations that
allocate no object the garbage collector tracks (nor, from Python 3.11, does
a call): a collection, which may run a dropped pool's finalizer, which takes
this lock, starts only at such an allocation, so never while it is held.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import PoolError

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["begin", "dispose", "end", "outside", "refuse", "unless_capturing"]

#: A backend's name and device; device None stands for every device of it.
_Key = tuple[str, int | None]

#: How long ``begin`` sleeps between looks at the sections (they are short).
_BEGIN_POLL_S = 0.0005

_lock = threading.Lock()
_captures: dict[_Key, int] = {}  # captures in progress per (name, device)
_capturing_of: dict[str, int] = {}  # captures in progress per backend name, any device
_sections: dict[_Key, int] = {}  # sections in progress per (name, device or None)
_deferred: dict[_Key, list[Callable[[], object]]] = {}  # disposals waiting for captures


def begin(backend: Backend) -> None:
    """Count one more capture in progress on ``backend``'s device, once no section
    of the device runs (sections are short: this polls)."""
    name = backend.name
    key: _Key = (name, backend.device)
    every: _Key = (name, None)
    while True:
        with _lock:
            if not (_sections.get(key, 0) or _sections.get(every, 0)):
                _captures[key] = _captures.get(key, 0) + 1
                _capturing_of[name] = _capturing_of.get(name, 0) + 1
                return
        time.sleep(_BEGIN_POLL_S)


def end(backend: Backend) -> None:
    """Undo one ``begin``; after the device's last capture, what waited is disposed of."""
    name = backend.name
    key: _Key = (name, backend.device)
    with _lock:
        _count_down(_captures, key)
        _count_down(_capturing_of, name)
        waiting = None if key in _captures else _deferred.pop(key, None)
    for release in waiting or ():
        try:
            dispose(name, backend.device, release)  # deferred again if a capture began
        except Exception as exc:  # whoever disposed of the objects has moved on
            warnings.warn(f"freeing CUDA streams or events failed: {exc!r}", RuntimeWarning, 2)


@contextlib.contextmanager
def unless_capturing(name: str, device: int | None) -> Iterator[bool]:
    """A section that may create or destroy streams and events on ``device``.

    Yields False, and holds nothing off, if a capture of the device (of any
    device of the named backend, for None) is in progress; else True, and no
    capture of it begins until the block ends.
    """
    key: _Key = (name, device)
    entered = _enter(key)
    try:
        yield entered
    finally:
        if entered:
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
    if not _enter(key):
        busy = sorted(
            d for n, d in list(_captures) if n == name and d is not None and device in (None, d)
        )
        where = f"device {busy[0]}" if busy else "a device"  # it may have ended since
        raise PoolError(
            f"a CUDA graph capture of {where} ({name} backend) is in progress "
            f"(pool.capture()); {doing} now could break it: {fix}"
        )
    try:
        yield
    finally:
        _leave(key)


def refuse(name: str, device: int | None, doing: str, fix: str) -> None:
    """Raise as ``outside`` does during a capture: the check alone, for code
    whose destroying goes through ``dispose``."""
    with outside(name, device, doing, fix):
        pass


def dispose(name: str, device: int, release: Callable[[], object]) -> None:
    """Call ``release``, which destroys streams or events of ``device``, in a
    section now, or once the device's captures in progress have all ended.

    A deferred ``release`` that raises is reported as a ``RuntimeWarning``.
    """
    key: _Key = (name, device)
    if _enter(key):
        try:
            release()
        finally:
            _leave(key)
        return
    fresh: list[Callable[[], object]] = []  # made outside the lock: see the locking rule
    with _lock:
        if key in _captures:
            _deferred.setdefault(key, fresh).append(release)
            return
    dispose(name, device, release)  # the capture ended between the two looks


def _enter(key: _Key) -> bool:
    """Start a section unless a capture of ``key``'s device is in progress."""
    name, device = key
    with _lock:
        busy = _capturing_of.get(name, 0) if device is None else _captures.get(key, 0)
        if not busy:
            _sections[key] = _sections.get(key, 0) + 1
    return not busy


def _leave(key: _Key) -> None:
    with _lock:
        _count_down(_sections, key)


def _count_down(counts: dict[Any, int], key: Any) -> None:
    """One fewer of ``key`` in ``counts``; none left, no entry."""
    if left := counts[key] - 1:
        counts[key] = left
    else:
        del counts[key]


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at fork
    # The parent's captures, sections and disposals do not exist in the child.
    for table in (_captures, _capturing_of, _sections, _deferred):
        table.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
