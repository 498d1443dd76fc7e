"""EventPool and PooledEvent: reusable CUDA events."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._backends import make_backend
from ._errors import LeaseError, PoolClosedError
from ._fastpath import EventCore, EventPoolCore, new_event
from ._stats import EventPoolStats
from ._stream_args import resolve_stream
from ._validate import check_count, check_flag

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["EventPool", "PooledEvent"]

class PooledEvent(EventCore):
    """An event borrowed from an ``EventPool``; return it with ``release()``.

    Recording and waiting follow CUDA: ``record`` captures the work queued on a
    stream so far, and a wait on the event orders only against that capture.
    Not thread-safe by itself: one holder uses it at a time. Its fields
    (handle, pool, id, whether it is held) live in the C base ``EventCore``.
    """

    __slots__ = ()

    def __new__(cls, *_: object) -> PooledEvent:
        # new_event is how the pool makes them, bypassing this.
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
                pointer), or None for the calling thread's current stream.
        """
        self._record(stream, "stream")

    def _record(self, stream: object, argument: str) -> None:
        handle = self._live_handle()
        backend = self._pool._backend
        if stream is None:
            target = backend.current_stream()
            if target is None:
                raise ValueError(
                    f"{argument}=None needs a current stream, and this thread has none "
                    f"on the host backend; enter a lease or pass {argument}="
                )
        else:
            target = resolve_stream(backend, stream, argument)
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


class EventPool(EventPoolCore):
    """A pool of reusable events on one device.

    Creating a CUDA event costs microseconds and may take a driver lock;
    reusing one costs a list pop and append. ``acquire`` and ``release`` are
    thread-safe and lock-free on the fast path (in C).

    Args:
        initial_size: Events created up front.
        max_size: Bound on the idle events kept; a release beyond it destroys
            the event.
        timing: Create timing events (needed by ``elapsed_time``).
        device: Device ordinal, or None for the current device.
        backend: ``"auto"``, ``"cupy"`` or ``"host"`` (see the README).
    """

    def __init__(
        self,
        initial_size: int = 8,
        max_size: int = 64,
        timing: bool = False,
        device: int | None = None,
        backend: str | Backend = "auto",
    ) -> None:
        check_count("initial_size", initial_size)
        check_count("max_size", max_size)
        if initial_size > max_size:
            raise ValueError(f"initial_size={initial_size} exceeds max_size={max_size}")
        check_flag("timing", timing)
        self._backend: Backend = (
            make_backend(backend, device) if isinstance(backend, str) else backend
        )
        self.timing = timing
        self.max_size = max_size
        # Re-entrant: a dropped lease collected while this thread holds the lock
        # (GC runs on any allocation) may acquire an event for its release.
        self._lock = threading.RLock()
        # Idle events are kept as (backend handle, event_id); every acquire
        # wraps one in a fresh PooledEvent, so a released PooledEvent stays
        # dead even after its CUDA event is handed to someone else.
        self._idle = []
        self._created = 0
        self._destroyed = 0
        self._closed_reason = None  # why the pool stopped serving, once it has
        for _ in range(initial_size):
            self._idle.append(self._create())

    def _create(self) -> tuple[Any, int]:
        handle = self._backend.create_event(self.timing)
        with self._lock:
            event_id = self._created
            self._created += 1
        return handle, event_id

    # acquire() and release(event) are EventPoolCore's, in C: a wait between
    # leases takes one of each. Anything unusual comes to the two methods below.

    def _acquire_slow(self) -> PooledEvent:
        """Acquire when the pool is closed or has no idle event."""
        if self._closed_reason is not None:
            raise PoolClosedError(self._closed_reason)
        handle, event_id = self._create()
        return new_event(self, handle, event_id)

    def _release_slow(self, event: PooledEvent) -> None:
        """Release a bad argument, an event released already, or into a closed or full pool."""
        if not isinstance(event, PooledEvent):
            raise TypeError(f"event={event!r} must be a PooledEvent from this pool")
        if event._pool is not self:
            raise LeaseError(f"event {event.event_id} belongs to another EventPool")
        handle = event._take_hold()  # atomic: of two racing releases, one gets the handle
        if handle is None:
            raise LeaseError(f"event {event.event_id} was already released")
        if self._closed_reason is not None or len(self._idle) >= self.max_size:
            self._destroy(handle)
        else:
            self._idle.append((handle, event.event_id))

    def _destroy(self, handle: Any) -> None:
        self._backend.destroy_event(handle)
        with self._lock:
            self._destroyed += 1

    @contextlib.contextmanager
    def event_context(self) -> Iterator[PooledEvent]:
        """Acquire an event for the ``with`` block and release it afterwards."""
        event = self.acquire()
        try:
            yield event
        finally:
            self.release(event)

    def clear(self) -> None:
        """Destroy the idle events; events still held are destroyed on release."""
        while True:
            try:
                handle, _ = self._idle.pop()
            except IndexError:
                return
            self._destroy(handle)

    def _close(self) -> None:
        self._closed_reason = "the pool that owns this EventPool was closed"
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
