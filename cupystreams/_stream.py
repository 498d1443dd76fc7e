"""PooledStream: one long-lived stream owned by a pool."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._fastpath import StreamCore, now_ns
from ._stats import StreamStats
from ._types import StreamKind, StreamState

if TYPE_CHECKING:
    from ._backends import Backend
    from ._events import PooledEvent
    from ._pool import CudaStreamPool

__all__ = ["PooledStream"]


class PooledStream(StreamCore):
    """A stream that belongs to a ``CudaStreamPool`` for the pool's whole life.

    Users meet it as ``lease.stream``; it has no public constructor. Its
    counters are written only by the lease that holds it, which is exclusive,
    so they need no lock; ``stats`` reads them as a frozen snapshot. The
    fields the lease hot path touches (``state``, the lease counters, the
    lane, what entering needs) live in the C base ``StreamCore``.
    """

    __slots__ = (
        "_affinity_hits",
        "_capturing",
        "_host_errors",
        "_pool",
        "_waits",
        "kind",
        "priority",
        "stream_id",
    )

    _affinity_hits: int
    _capturing: Callable[[], int] | None
    _host_errors: deque[tuple[int | None, BaseException]]  # (lease serial or None, error)
    _pool: CudaStreamPool
    _waits: int
    kind: StreamKind
    priority: int
    stream_id: int

    def __new__(cls, *_: object) -> PooledStream:
        # StreamCore.__new__ is how the pool makes them, bypassing this.
        raise TypeError("PooledStream has no public constructor; lease one with pool.acquire_*()")

    @classmethod
    def _create(
        cls,
        pool: CudaStreamPool,
        backend: Backend,
        stream_id: int,
        kind: StreamKind,
        priority: int,
        non_blocking: bool,
    ) -> PooledStream:
        self = StreamCore.__new__(cls)
        self._pool = pool
        self._backend = backend
        self._handle = backend.create_stream(priority, non_blocking)
        self._capturing = backend.capture_probe(self._handle)
        self._capture_handle = backend.capture_handle(self._handle)
        self._device = backend.device
        self._cupy_current = backend.cupy_current
        self.stream_id = stream_id
        self.kind = kind
        self.priority = priority
        self.state = StreamState.IDLE
        self._acquisitions = 0
        self._active_ns = 0
        self._affinity_hits = 0
        self._waits = 0
        self._lease_start = 0
        self._host_errors = deque()
        return self

    @property
    def stream(self) -> Any:
        """The backend's stream: a ``cupy.cuda.Stream`` on the cupy backend.

        Raises:
            PoolClosedError: The pool was closed (its streams are gone).
        """
        self._check_open()
        return self._handle

    @property
    def ptr(self) -> int:
        """The raw ``cudaStream_t`` (``TypeError`` on the host backend).

        Raises:
            PoolClosedError: The pool was closed (its streams are gone).
        """
        self._check_open()
        return self._backend.stream_ptr(self._handle)

    @property
    def stats(self) -> StreamStats:
        """A frozen snapshot of this stream's counters."""
        active_ns = self._active_ns
        if self.state is StreamState.LEASED:
            active_ns += now_ns() - self._lease_start
        return StreamStats(
            stream_id=self.stream_id,
            kind=self.kind.value,
            priority=self.priority,
            acquisitions=self._acquisitions,
            total_active_ms=active_ns / 1e6,
            affinity_hits=self._affinity_hits,
            waits=self._waits,
        )

    def _check_open(self) -> None:
        # The pool's flag, not this stream's state: an acquire racing close()
        # may have stamped the state LEASED after close() stamped it CLOSED.
        if (error := self._pool._closed_error()) is not None:
            raise error

    def synchronize(self) -> None:
        """Block until all work queued on the stream is done.

        Re-raises the first exception that a host function launched on this
        stream raised and nobody has reported yet (any lease's).
        """
        self._synchronize(None)

    def _synchronize(self, owner: int | None) -> None:
        """Synchronize; report host-function errors of lease ``owner`` (None: of anyone)."""
        self._check_open()
        self._backend.synchronize_stream(self._handle)
        errors = self._host_errors
        if not errors:
            return
        # Each error is reported once, to its lease (or to a stream-wide call):
        # a later lease of this stream never sees an earlier lease's failure.
        mine = [entry for entry in list(errors) if owner is None or entry[0] == owner]
        for entry in mine:
            errors.remove(entry)  # one atomic removal each: callbacks may append meanwhile
        if mine:
            raise mine[0][1]

    def _check_event(self, event: object) -> Any:
        from ._events import PooledEvent

        if not isinstance(event, PooledEvent):
            raise TypeError(f"event={event!r} must be a PooledEvent (from pool.events.acquire())")
        return event._live_handle()

    def query(self) -> bool:
        """True when all work queued on the stream has finished."""
        self._check_open()
        return self._backend.query_stream(self._handle)

    def wait_event(self, event: PooledEvent) -> None:
        """Make later work on this stream wait, on the device, for ``event``."""
        self._check_open()
        self._backend.wait_event(self._handle, self._check_event(event))
        self._waits += 1

    def launch_host_func(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a host thread after the stream's earlier work.

        ``fn`` must not call CUDA. An exception it raises is kept and raised by
        the stream's next ``synchronize()``.
        """
        self._launch_host_func(fn, None)

    def _launch_host_func(self, fn: Callable[[], None], owner: int | None) -> None:
        self._check_open()
        if not callable(fn):
            raise TypeError(f"fn={fn!r} must be a callable taking no arguments")
        errors = self._host_errors

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # kept for synchronize(), never lost
                errors.append((owner, exc))

        self._backend.launch_host_func(self._handle, run)

    def __repr__(self) -> str:
        return (
            f"<PooledStream {self.kind.value}#{self.stream_id} "
            f"priority={self.priority} {self.state.value}>"
        )
