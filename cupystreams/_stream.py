"""PooledStream: one long-lived stream owned by a pool."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from ._errors import PoolClosedError
from ._stats import StreamStats
from ._types import StreamKind, StreamState

if TYPE_CHECKING:
    from ._affinity import KeyState
    from ._backends import Backend
    from ._core import PoolCore
    from ._events import PooledEvent
    from ._lanes import Lane

__all__ = ["PooledStream"]


class PooledStream:
    """A stream that belongs to a ``CudaStreamPool`` for the pool's whole life.

    Users meet it as ``lease.stream``; it has no public constructor. Its
    state and counters change under the pool's lock (see ``_core``), and
    ``stats`` reads them there as a frozen snapshot.
    """

    __slots__ = (
        "__weakref__",
        "_acquisitions",
        "_active_ns",
        "_affinity_hits",
        "_backend",
        "_capture_probe",
        "_core",
        "_handle",
        "_host_errors",
        "_lane",
        "_lease_start",
        "_unrecorded_key",
        "_waits",
        "kind",
        "priority",
        "state",
        "stream_id",
    )

    _acquisitions: int
    _active_ns: int  # leased time of the finished leases
    _affinity_hits: int
    _backend: Backend
    # Answers "is this stream capturing a CUDA graph?" (non-zero: yes) in one
    # call; None on backends without graphs.
    _capture_probe: Callable[[], int] | None
    _core: PoolCore
    _handle: Any  # the backend's stream; None once the pool closed
    _host_errors: list[tuple[int | None, BaseException]]  # (lease serial or None, error)
    _lane: Lane
    _lease_start: int  # perf_counter_ns() when the current lease began
    # The key whose last lease ended here and whose end has not been recorded
    # in an event yet: recorded when the stream goes to another holder.
    _unrecorded_key: KeyState | None
    _waits: int
    kind: StreamKind
    priority: int
    state: StreamState
    stream_id: int

    def __new__(cls, *_: object) -> PooledStream:
        raise TypeError("PooledStream has no public constructor; lease one with pool.acquire_*()")

    @classmethod
    def _create(
        cls, core: PoolCore, lane: Lane, stream_id: int, priority: int, non_blocking: bool
    ) -> PooledStream:
        self = object.__new__(cls)
        self._core = core
        self._lane = lane
        self._backend = core.backend
        self._handle = core.backend.create_stream(priority, non_blocking)
        self._capture_probe = core.backend.capture_probe(self._handle)
        self.stream_id = stream_id
        self.kind = lane.kind
        self.priority = priority
        self.state = StreamState.IDLE
        self._acquisitions = 0
        self._active_ns = 0
        self._affinity_hits = 0
        self._waits = 0
        self._lease_start = 0
        self._unrecorded_key = None
        self._host_errors = []
        return self

    @property
    def stream(self) -> Any:
        """The backend's stream: a ``cupy.cuda.Stream`` on the cupy backend.

        Raises:
            PoolClosedError: The pool was closed (its streams are gone).
        """
        return self._open_handle()

    @property
    def ptr(self) -> int:
        """The raw ``cudaStream_t`` (``TypeError`` on the host backend).

        Raises:
            PoolClosedError: The pool was closed (its streams are gone).
        """
        return self._backend.stream_ptr(self._open_handle())

    @property
    def stats(self) -> StreamStats:
        """A frozen snapshot of this stream's counters."""
        with self._core:
            active_ns = self._active_ns
            if self.state is StreamState.LEASED:
                active_ns += perf_counter_ns() - self._lease_start
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
        self._open_handle()

    def _open_handle(self) -> Any:
        """The backend's stream, or ``PoolClosedError`` once the pool is closed.

        Read once per call: ``close()`` on another thread may drop it at any
        moment, and a call must use the handle it checked.
        """
        handle = self._handle
        if handle is None or self._core.closed_reason is not None:
            raise PoolClosedError(self._core.closed_reason or "the pool is closed")
        return handle

    def synchronize(self) -> None:
        """Block until all work queued on the stream (host functions too) is done.

        Re-raises the first exception that a host function launched on this
        stream raised and nobody has reported yet (any lease's).
        """
        self._synchronize(None)

    def _synchronize(self, owner: int | None) -> None:
        """Synchronize; report host-function errors of lease ``owner`` (None: of anyone)."""
        self._backend.synchronize_stream(self._open_handle())
        # Each error is reported once, to its lease (or to a stream-wide call):
        # a later lease of this stream never sees an earlier lease's failure.
        with self._core:
            errors = self._host_errors
            mine = [entry for entry in errors if owner is None or entry[0] == owner]
            errors[:] = [entry for entry in errors if entry not in mine]
        if mine:
            try:
                raise mine[0][1]
            finally:
                del mine  # its traceback holds this frame (and its callers': the pool)

    def query(self) -> bool:
        """True when all work queued on the stream has finished."""
        return self._backend.query_stream(self._open_handle())

    def wait_event(self, event: PooledEvent) -> None:
        """Make later work on this stream wait, on the device, for ``event``."""
        from ._events import PooledEvent

        handle = self._open_handle()
        if not isinstance(event, PooledEvent):
            raise TypeError(f"event={event!r} must be a PooledEvent (from pool.events.acquire())")
        self._backend.wait_event(handle, event._live_handle())
        with self._core:
            self._waits += 1

    def launch_host_func(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a thread of the library after the stream's earlier work.

        ``fn`` must not call CUDA. Later work on the stream does not wait for
        ``fn``; ``synchronize()`` does. An exception ``fn`` raises is kept and
        raised by the stream's next ``synchronize()``.
        """
        self._launch_host_func(fn, None)

    def _launch_host_func(self, fn: Callable[[], None], owner: int | None) -> None:
        handle = self._open_handle()
        if not callable(fn):
            raise TypeError(f"fn={fn!r} must be a callable taking no arguments")
        core, errors = self._core, self._host_errors

        def run(device_error: BaseException | None) -> None:
            try:
                if device_error is not None:
                    raise device_error
                fn()
            except BaseException as exc:  # kept for synchronize(), never lost
                with core:
                    errors.append((owner, exc))

        self._backend.launch_host_func(handle, run)

    def __repr__(self) -> str:
        return (
            f"<PooledStream {self.kind.value}#{self.stream_id} "
            f"priority={self.priority} {self.state.value}>"
        )
