"""EventPool and PooledEvent: reusable CUDA events.

Locking: ``EventPool._lock`` (a plain ``threading.Lock``) guards the pool's
``_idle`` list, its ``_created`` / ``_destroyed`` counters, ``_closed_reason``
and every event's ``_held`` flag (one exception: a dropped stream pool's
finalizer that cannot take the lock in time stores ``_closed_reason`` alone).
While it is held, the only other lock of the library taken is the capture
registry's leaf lock (``_capturing``), and no Python code of a user's runs
under it. A stream pool may take it while it holds its own lock (to record
a key's end), never the other way round.

While a CUDA graph capture of its device is in progress (``_capturing``) the
pool creates and destroys no event: ``acquire`` hands out idle events only,
and ``release`` keeps every event, beyond ``max_size`` if need be.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _capturing
from ._backends import make_backend, resolve_backend_name
from ._errors import LeaseError, PoolClosedError, PoolExhaustedError
from ._stats import EventPoolStats
from ._stream_args import resolve_stream
from ._validate import check_count, check_flag

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["EventPool", "PooledEvent"]

_new = object.__new__


class PooledEvent:
    """An event borrowed from an ``EventPool``; return it with ``release()``.

    Recording and waiting follow CUDA: ``record`` captures the work queued on a
    stream so far, and a wait on the event orders only against that capture.
    Not thread-safe by itself: one holder uses it at a time.
    """

    __slots__ = ("__weakref__", "_handle", "_held", "_pool", "event_id")

    _handle: Any
    _held: bool
    _pool: EventPool
    event_id: int

    def __new__(cls, *_: object) -> PooledEvent:
        raise TypeError("PooledEvent has no public constructor; use pool.events.acquire()")

    @property
    def event(self) -> Any:
        """The backend's event: a ``cupy.cuda.Event`` on the cupy backend."""
        return self._live_handle()

    @property
    def timing(self) -> bool:
        """Whether this event records timestamps (see ``elapsed_time``)."""
        return self._pool.timing

    def _live_handle(self) -> Any:
        if not self._held:
            raise LeaseError(f"event {self.event_id} was released to its pool; acquire a new one")
        if (reason := self._pool._closed_reason) is not None:
            raise PoolClosedError(reason)
        return self._handle

    def record(self, stream: object = None) -> None:
        """Record the work queued so far on ``stream`` (default: the current stream).

        Args:
            stream: Anything accepted as a stream (a lease, a pooled stream, a
                ``cupy.cuda.Stream``, an object with ``__cuda_stream__``, a raw
                pointer, 0 for the legacy default stream), or None for the
                calling thread's current stream.
        """
        self._record(stream, "stream")

    def _record(self, stream: object, argument: str) -> None:
        handle = self._live_handle()
        backend = self._pool._backend
        target = (
            backend.current_stream()
            if stream is None
            else resolve_stream(backend, stream, argument)
        )
        backend.record(handle, target)

    def synchronize(self) -> None:
        """Block until the recorded work is done."""
        self._pool._backend.synchronize_event(self._live_handle())

    def query(self) -> bool:
        """True when the recorded work is done (or nothing was recorded)."""
        return self._pool._backend.query_event(self._live_handle())

    def elapsed_time(self, end_event: PooledEvent) -> float:
        """Milliseconds from this event to ``end_event``; both must be timing events."""
        if not isinstance(end_event, PooledEvent):
            raise TypeError(f"end_event={end_event!r} must be a PooledEvent")
        if not (self.timing and end_event.timing):
            raise ValueError(
                "elapsed_time needs timing events on both ends; acquire them from "
                "EventPool(timing=True) (events without timing are cheaper to record)"
            )
        return self._pool._backend.elapsed_time(self._live_handle(), end_event._live_handle())

    def release(self) -> None:
        """Return the event to its pool (same as ``pool.release(event)``)."""
        self._pool.release(self)

    def __repr__(self) -> str:
        state = "held" if self._held else "released"
        return f"<PooledEvent #{self.event_id} timing={self.timing} {state}>"


class EventPool:
    """A pool of reusable events on one device.

    Creating a CUDA event costs microseconds and may take a driver lock;
    reusing one costs a list pop and append under a lock. ``acquire`` and
    ``release`` are thread-safe. ``acquire`` never blocks: with no idle event
    it creates one, except while a CUDA graph capture of the device is in
    progress (``pool.capture()``), when creating one could break the capture:
    it raises ``PoolExhaustedError`` instead. A capture tops the idle events up
    to ``max_size`` before it begins.

    Args:
        initial_size: Events created up front; None (the default) means
            ``min(8, max_size)``.
        max_size: Bound on the idle events kept; a release beyond it frees
            the event.
        timing: Create timing events (needed by ``elapsed_time``).
        device: Device ordinal, or None for the current device.
        backend: ``"auto"``, ``"cupy"`` or ``"host"``, as for ``CudaStreamPool``.
    """

    def __init__(
        self,
        initial_size: int | None = None,
        max_size: int = 64,
        timing: bool = False,
        device: int | None = None,
        backend: str | Backend = "auto",
    ) -> None:
        check_count("max_size", max_size)
        if initial_size is None:
            initial_size = min(8, max_size)
        check_count("initial_size", initial_size)
        if initial_size > max_size:
            raise ValueError(
                f"initial_size={initial_size} exceeds max_size={max_size}; "
                f"pass max_size >= {initial_size} or a smaller initial_size"
            )
        check_flag("timing", timing)
        if initial_size:  # checked before a backend is made: making one calls the driver
            if isinstance(backend, str):
                where = (resolve_backend_name(backend), device if isinstance(device, int) else None)
            else:
                where = (backend.name, backend.device)
            _capturing.refuse(*where, "creating events", "create the EventPool before the capture")
        self._backend: Backend = (
            make_backend(backend, device) if isinstance(backend, str) else backend
        )
        self.timing = timing
        self.max_size = max_size
        self._lock = threading.Lock()
        # Idle events are kept as (backend handle, event_id); every acquire
        # wraps one in a fresh PooledEvent, so a released PooledEvent stays
        # dead even after its CUDA event is handed to someone else.
        self._idle: list[tuple[Any, int]] = []
        self._created = 0
        self._destroyed = 0
        self._closed_reason: str | None = None  # why the pool stopped serving, once it has
        self._idle.extend(self._create() for _ in range(initial_size))

    def _create(self) -> tuple[Any, int]:
        if _capturing.in_progress(self._backend):
            raise PoolExhaustedError(
                f"no idle event in the pool's EventPool, and none is created while a CUDA "
                f"graph capture of device {self._backend.device} is in progress (it could "
                f"break the capture); create the pool with a larger event_pool_size (an "
                f"EventPool with a larger max_size; now {self.max_size}): a capture that "
                "the pool begins fills the idle events up to it first"
            )
        handle = self._backend.create_event(self.timing)  # outside the lock: a CUDA call
        with self._lock:
            event_id = self._created
            self._created += 1
        return handle, event_id

    def acquire(self) -> PooledEvent:
        """An idle event, or a new one when none is idle.

        Raises:
            PoolClosedError: The stream pool that owns this event pool was closed.
            PoolExhaustedError: No event is idle while a CUDA graph capture of the
                device is in progress (no event is created then).
        """
        event = _new(PooledEvent)  # allocated first: nothing below can then fail half-way
        event._pool = self
        lock = self._lock
        lock.acquire()  # not `with`: this is a hot path, and `with` costs twice as much
        try:
            if self._closed_reason is not None:
                event._held = False
                raise PoolClosedError(self._closed_reason)
            taken = self._idle.pop() if self._idle else None
            event._held = taken is not None
        finally:
            lock.release()
        if taken is None:
            taken = self._create()
            event._held = True
        event._handle, event.event_id = taken
        return event

    def release(self, event: PooledEvent) -> None:
        """Return ``event``; the same as ``event.release()``.

        Raises:
            TypeError: Not a ``PooledEvent``.
            LeaseError: Released already, or an event of another pool.
        """
        if type(event) is not PooledEvent:
            raise TypeError(f"event={event!r} must be a PooledEvent from this pool")
        if event._pool is not self:
            raise LeaseError(f"event {event.event_id} belongs to another EventPool")
        lock = self._lock
        lock.acquire()
        try:
            if not event._held:
                raise LeaseError(f"event {event.event_id} was already released")
            event._held = False
            if self._closed_reason is None and (
                len(self._idle) < self.max_size or _capturing.in_progress(self._backend)
            ):  # an event destroyed during a capture could break it: kept, over the bound
                self._idle.append((event._handle, event.event_id))
            else:
                self._destroyed += 1  # freed with its last reference, below
        finally:
            lock.release()
        event._handle = None

    def _fill_idle(self) -> None:
        """Create idle events up to ``max_size``: a capture calls this before it begins,
        when creating events is still safe, since it may create none afterwards."""
        if _capturing.in_progress(self._backend):
            return  # another capture of the device runs: nothing may be created now
        with self._lock:
            missing = 0 if self._closed_reason is not None else self.max_size - len(self._idle)
        made = [self._create() for _ in range(missing)]
        with self._lock:
            if self._closed_reason is None:
                self._idle.extend(made)
            else:
                self._destroyed += len(made)

    @contextlib.contextmanager
    def event_context(self) -> Iterator[PooledEvent]:
        """Acquire an event for the ``with`` block and release it afterwards."""
        event = self.acquire()
        try:
            yield event
        finally:
            self.release(event)

    def clear(self) -> None:
        """Free the idle events; events still held are freed on release."""
        with self._lock:
            freed, self._idle = self._idle, []
            self._destroyed += len(freed)
        del freed  # CUDA events go with their last reference, outside the lock

    def _close(self, reason: str, lock_wait: float = -1) -> None:
        """Refuse further acquires and free the idle events.

        ``lock_wait`` bounds the wait for the lock (a dropped pool's finalizer,
        which may run inside one of this pool's critical sections on the very
        thread that holds the lock): when it runs out, the pool is only marked
        closed, and its idle events are freed with it.
        """
        if not self._lock.acquire(timeout=lock_wait):
            self._closed_reason = reason  # one store: seen by the next holder of the lock
            return
        try:
            self._closed_reason = reason
        finally:
            self._lock.release()
        self.clear()

    def stats(self) -> EventPoolStats:
        """A frozen snapshot of the pool's figures."""
        with self._lock:
            idle = len(self._idle)
            return EventPoolStats(
                created=self._created,
                idle=idle,
                in_use=self._created - self._destroyed - idle,
                max_size=self.max_size,
                timing=self.timing,
            )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<EventPool {self._backend.name}:{self._backend.device} "
            f"{s.in_use} in use, {s.idle}/{s.max_size} idle, timing={s.timing}>"
        )
