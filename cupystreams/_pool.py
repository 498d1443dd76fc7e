"""CudaStreamPool: exclusive leases on long-lived streams, grouped by kind."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
import weakref
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any

from ._affinity import AffinityTable
from ._backends import make_backend
from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError
from ._events import EventPool, PooledEvent
from ._fastpath import PoolCore, new_lease, now_ns
from ._lanes import Lane
from ._lease import StreamLease
from ._stats import KindStats, PoolStats, StreamStats
from ._stream import PooledStream
from ._teardown import destroy_streams, forget_parked, start_teardown_thread
from ._types import StreamKind, StreamPriority, StreamState
from ._validate import check_count, check_flag, check_timeout

if TYPE_CHECKING:
    from ._backends import Backend
    from ._trace import Trace

__all__ = ["CudaStreamPool"]

_SIZE_ARGUMENT = {
    StreamKind.COMPUTE: "compute_streams",
    StreamKind.COMM: "comm_streams",
    StreamKind.HIGH_PRIORITY: "high_priority_streams",
}
_live_pools: weakref.WeakSet[CudaStreamPool] = weakref.WeakSet()
_queue_warning_given = False
_FORKED = (
    "this pool was created before fork(); CUDA streams do not survive fork, "
    "so create a new pool in the child process"
)


class CudaStreamPool(PoolCore):
    """A pool of long-lived CUDA streams handed out as exclusive leases.

    Streams come in three kinds, each with its own FIFO queue of waiters:
    compute and comm streams at CUDA's default (least) priority, and
    high-priority streams at the device's greatest priority. Every method is
    thread-safe; the uncontended acquire/release path takes no lock.

    Args:
        compute_streams: Streams for kernels.
        comm_streams: Streams for copies and communication.
        high_priority_streams: Streams for latency-critical work.
        event_pool_size: Bound on the idle events the pool's ``EventPool`` keeps.
        enable_affinity: Prefer the stream an affinity key used last. Ordering
            under a key is kept either way.
        device: Device ordinal; None means the current device.
        backend: ``"auto"`` (cupy, or ``CUPYSTREAMS_BACKEND``), ``"cupy"`` or
            ``"host"``.
        high_priority: Priority of the high-priority streams: a
            ``StreamPriority`` or an int inside ``priority_range``.
        non_blocking: Create streams with ``cudaStreamNonBlocking`` so they do
            not synchronize with the legacy default stream.
        max_affinity_keys: Bound on the keys remembered; the least recently
            used idle key is forgotten first, and a forgotten key starts
            afresh (no ordering against its earlier leases).

    Raises:
        BackendUnavailableError: ``backend="auto"``/``"cupy"`` without a usable GPU.
        ValueError, TypeError: A bad argument; nothing is created.
    """

    def __init__(
        self,
        compute_streams: int = 4,
        comm_streams: int = 2,
        high_priority_streams: int = 1,
        event_pool_size: int = 32,
        enable_affinity: bool = True,
        device: int | None = None,
        backend: str = "auto",
        *,
        high_priority: StreamPriority | int = StreamPriority.HIGH,
        non_blocking: bool = True,
        max_affinity_keys: int = 1024,
    ) -> None:
        given = {
            StreamKind.COMPUTE: compute_streams,
            StreamKind.COMM: comm_streams,
            StreamKind.HIGH_PRIORITY: high_priority_streams,
        }
        sizes = {kind: check_count(_SIZE_ARGUMENT[kind], value) for kind, value in given.items()}
        if sum(sizes.values()) == 0:
            raise ValueError(
                "compute_streams, comm_streams and high_priority_streams are all 0; "
                "a pool needs at least one stream"
            )
        check_count("event_pool_size", event_pool_size)
        if check_count("max_affinity_keys", max_affinity_keys) == 0:
            raise ValueError("max_affinity_keys=0 leaves no room for keys; pass at least 1")
        check_flag("enable_affinity", enable_affinity)
        check_flag("non_blocking", non_blocking)

        start_teardown_thread()  # for this pool's finalizer, should CUDA's thread run it
        self._backend: Backend = make_backend(backend, device)
        least, greatest = self._backend.priority_range()
        high = self._resolve_priority(high_priority, least, greatest)
        self._warn_if_over_hardware_queues(sum(sizes.values()))

        self.enable_affinity = enable_affinity
        self._lock = threading.RLock()  # re-entrant: a lease finalizer may run under it
        self._closed = False
        self._forked = False
        self._timeouts = 0
        self._exhaustions = 0
        self._keys = AffinityTable(max_affinity_keys, self._lock)
        self.events = EventPool(
            initial_size=min(8, event_pool_size),
            max_size=event_pool_size,
            backend=self._backend,
        )
        self._streams: list[PooledStream] = []
        self._lanes: dict[StreamKind, Lane] = {}
        handles: list[Any] = []
        # The finalizer's arguments hold the backend, the raw stream handles
        # and the objects holding CUDA events, never the pool or its
        # PooledStreams (which point back at the pool), so a pool dropped
        # without close() can still be collected.
        self._finalizer = weakref.finalize(
            self, destroy_streams, self._backend, handles, (self.events, self._keys.events)
        )
        self._finalizer.atexit = False  # no CUDA calls while the interpreter shuts down
        try:
            for kind, count in sizes.items():
                priority = high if kind is StreamKind.HIGH_PRIORITY else least
                streams = []
                for _ in range(count):
                    stream = PooledStream._create(
                        self, self._backend, len(self._streams), kind, priority, non_blocking
                    )
                    handles.append(stream._handle)
                    self._streams.append(stream)
                    streams.append(stream)
                self._lanes[kind] = lane = Lane(kind, streams, self._lock)
                for stream in streams:
                    stream._lane = lane
        except BaseException:
            self._finalizer()  # a half-built pool leaves no stream behind
            self.events._close()
            raise
        self._compute = self._lanes[StreamKind.COMPUTE]
        self._comm = self._lanes[StreamKind.COMM]
        self._high = self._lanes[StreamKind.HIGH_PRIORITY]
        _live_pools.add(self)

    # -- construction helpers ----------------------------------------------

    @staticmethod
    def _resolve_priority(priority: StreamPriority | int, least: int, greatest: int) -> int:
        if priority is StreamPriority.NORMAL:
            return least
        if priority is StreamPriority.HIGH:
            return greatest
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"high_priority={priority!r} must be a StreamPriority or an int")
        if not greatest <= priority <= least:
            raise ValueError(
                f"high_priority={priority} is out of range {[greatest, least]} "
                "(CUDA numbers: lower is more urgent)"
            )
        return priority

    def _warn_if_over_hardware_queues(self, total: int) -> None:
        global _queue_warning_given
        # Read even when a warning was given, so a bad value is always an error.
        queues = self._backend.hardware_queues()
        if queues is None or total <= queues or _queue_warning_given:
            return
        _queue_warning_given = True
        warnings.warn(
            f"the pool has {total} streams but the device has {queues} hardware work "
            f"queues, so busy streams beyond that serialize falsely; set "
            f"CUDA_DEVICE_MAX_CONNECTIONS={min(32, total)} (at most 32) before CUDA "
            "is initialized, or use fewer streams",
            RuntimeWarning,
            stacklevel=3,
        )

    # -- properties ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after ``close()`` (or in a child process after ``fork``)."""
        return self._closed

    @property
    def device(self) -> int:
        """The device ordinal the pool's streams live on."""
        return self._backend.device

    @property
    def backend(self) -> str:
        """The backend's name: ``"cupy"`` or ``"host"``."""
        return self._backend.name

    @property
    def priority_range(self) -> tuple[int, int]:
        """``(least, greatest)`` stream priority of the device, in CUDA's numbers."""
        return self._backend.priority_range()

    # -- acquire ---------------------------------------------------------------

    # acquire_compute, acquire_comm and acquire_high_priority are PoolCore's,
    # in C: the uncontended path is the library's hot loop. Anything else
    # (keys, timeouts, waiters, bad arguments, a closed pool) comes to _acquire.

    def _acquire(
        self, lane: Lane, key: Hashable | None, blocking: object, timeout: object
    ) -> StreamLease:
        if not isinstance(blocking, bool):
            raise TypeError(f"blocking={blocking!r} must be a bool")
        seconds = check_timeout(timeout)
        if key is not None:
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"affinity_key={key!r} must be hashable") from None
        if (error := self._closed_error()) is not None:
            raise error
        if lane.capacity == 0:
            name = _SIZE_ARGUMENT[lane.kind]
            raise ValueError(
                f"this pool has no {lane.kind.value} streams; create it with {name}=N (N > 0)"
            )
        deadline = None if seconds is None else time.monotonic() + seconds
        if key is None:
            return new_lease(self._take(lane, blocking, deadline, None), None)
        return self._acquire_keyed(lane, key, blocking, deadline)

    def _acquire_keyed(
        self, lane: Lane, key: Hashable, blocking: bool, deadline: float | None
    ) -> StreamLease:
        with self._lock:
            try:
                state = self._keys.reserve(
                    key, threading.get_ident(), blocking, deadline, self._closed_error, lane
                )
            except PoolTimeoutError:
                self._timeouts += 1
                raise
            except PoolExhaustedError:
                self._exhaustions += 1
                raise
        last = state.last_stream_id
        previous = None if last is None else self._streams[last]
        prefer = previous if self.enable_affinity and previous in lane.streams else None
        try:
            stream = self._take(lane, blocking, deadline, prefer)
        except BaseException:
            with self._lock:
                self._keys.unreserve(key, state)
            raise
        try:
            if stream is previous:
                stream._affinity_hits += 1  # same stream: stream order already holds
            elif state.last_event is not None:
                # The key moves: its earlier work must finish before this lease's.
                self._backend.wait_event(stream._handle, state.last_event._handle)
                stream._waits += 1
        except BaseException:
            lane.give_back(stream)
            with self._lock:
                self._keys.unreserve(key, state)
            raise
        return new_lease(stream, key)

    def _take(
        self, lane: Lane, blocking: bool, deadline: float | None, prefer: PooledStream | None
    ) -> PooledStream:
        try:
            return lane.take(blocking, deadline, prefer, self._closed_error)
        except PoolExhaustedError:
            with self._lock:
                self._exhaustions += 1
            raise
        except PoolTimeoutError:
            with self._lock:
                self._timeouts += 1
            raise

    def _closed_error(self) -> PoolClosedError | None:
        """The error a use of the pool should raise now, or None while it is open."""
        if not self._closed:
            return None
        if self._forked:
            return PoolClosedError(_FORKED)
        return PoolClosedError("the pool is closed; create a new CudaStreamPool")

    # -- release ---------------------------------------------------------------

    def release(self, lease: StreamLease) -> None:
        """End ``lease`` and return its stream; same as ``lease.release()``.

        Raises:
            LeaseError: Released already, issued by another pool, or its
                stream is still capturing a CUDA graph.
        """
        if not isinstance(lease, StreamLease):
            raise TypeError(f"lease={lease!r} must be a StreamLease of this pool")
        stream = lease._stream
        if stream is not None and stream._pool is not self:
            raise LeaseError("this lease was issued by another pool; release it there")
        lease.release()

    def _release_slow(self, lease: StreamLease, stream: PooledStream) -> None:
        """Release a lease that is keyed, capturing, or outlived its pool."""
        if self._closed:
            lease._take_stream()  # the pool closed under the lease: nothing to return
            return
        if stream._capturing is not None and stream._capturing():
            raise LeaseError(
                f"{stream!r} is still capturing a CUDA graph; end the capture, then release"
            )
        key = lease._key
        # A keyed lease's end is recorded before the stream can be re-leased,
        # so the record never lands in a later holder's work or graph capture.
        try:
            event = self._end_of_work(stream) if key is not None else None
        except PoolClosedError:
            if not self._closed:
                raise
            lease._take_stream()  # close() won the race: releasing is a no-op now
            return
        if lease._take_stream() is None:  # atomic: of two racing releases, one gets here
            if event is not None:
                self.events.release(event)
            raise LeaseError("this lease was already released")
        stream._active_ns += now_ns() - stream._lease_start
        stream.state = StreamState.IDLE
        stream._lane.give_back(stream)
        if event is not None:
            with self._lock:
                stale = self._keys.finish(key, stream, event)
            for old in stale:
                self.events.release(old)

    def _end_of_work(self, stream: PooledStream) -> PooledEvent:
        event = self.events.acquire()
        try:
            self._backend.record(event._handle, stream._handle)
        except BaseException:
            self.events.release(event)
            raise
        return event

    # -- context managers --------------------------------------------------------

    @contextlib.contextmanager
    def compute_context(self, affinity_key: Hashable | None = None) -> Iterator[StreamLease]:
        """Acquire a compute stream, make it current, release it on exit."""
        with self.acquire_compute(affinity_key) as lease:
            yield lease

    @contextlib.contextmanager
    def comm_context(self, affinity_key: Hashable | None = None) -> Iterator[StreamLease]:
        """Acquire a comm stream, make it current, release it on exit."""
        with self.acquire_comm(affinity_key) as lease:
            yield lease

    @contextlib.contextmanager
    def high_priority_context(self) -> Iterator[StreamLease]:
        """Acquire a high-priority stream, make it current, release it on exit."""
        with self.acquire_high_priority() as lease:
            yield lease

    # -- whole-pool operations -------------------------------------------------

    def record_event(self, lease_or_stream: object = None) -> PooledEvent:
        """Record the work queued so far on a stream into an event of ``events``.

        Args:
            lease_or_stream: Anything accepted as a stream, or None for the
                calling thread's current stream.
        """
        event = self.events.acquire()
        try:
            event._record(lease_or_stream, "lease_or_stream")
        except BaseException:
            self.events.release(event)
            raise
        return event

    def sync_all(self) -> None:
        """Block until the work on every pool stream is done."""
        if (error := self._closed_error()) is not None:
            raise error
        # Every stream is waited for even if one reports a host-function error.
        first_error: BaseException | None = None
        for stream in self._streams:
            try:
                stream.synchronize()
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def stats(self) -> PoolStats:
        """A consistent, frozen snapshot of the pool's occupancy and counters."""
        with self._lock:
            # The lock-free paths move streams meanwhile: each lane's idle
            # count is read once, so that leased + idle = capacity.
            closed = self._closed
            idle = {kind: 0 if closed else len(lane.idle) for kind, lane in self._lanes.items()}
            kinds = {
                kind: KindStats(
                    capacity=lane.capacity,
                    leased=0 if closed else lane.capacity - idle[kind],
                    idle=idle[kind],
                    waiting=lane.waiting,
                )
                for kind, lane in self._lanes.items()
            }
            return PoolStats(
                compute=kinds[StreamKind.COMPUTE],
                comm=kinds[StreamKind.COMM],
                high_priority=kinds[StreamKind.HIGH_PRIORITY],
                acquisitions=sum(stream._acquisitions for stream in self._streams),
                timeouts=self._timeouts,
                exhaustions=self._exhaustions,
                events=self.events.stats(),
                closed=self._closed,
            )

    def stream_stats(self) -> list[StreamStats]:
        """One frozen ``StreamStats`` per pooled stream, in ``stream_id`` order."""
        return [stream.stats for stream in self._streams]

    def close(self) -> None:
        """Wait for the pool's work, destroy its streams and free their memory.

        Idempotent. Threads blocked in acquire get ``PoolClosedError``; leases
        still out become invalid (their methods raise ``PoolClosedError``, and
        their release is a no-op).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for lane in self._lanes.values():
                lane.close()
            key_events = self._keys.clear()
            _mark_closed(self._streams)
        try:
            for event in key_events:
                self.events.release(event)
            self._finalizer()
        finally:
            for stream in self._streams:
                # Our last reference: the CUDA stream goes with it, unless a
                # user still holds the CuPy stream object (then it is theirs).
                stream._handle = None
            self.events._close()

    def __enter__(self) -> CudaStreamPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<CudaStreamPool {self._backend.name}:{self.device} closed>"
        parts = ", ".join(
            f"{kind.value} {lane.capacity - len(lane.idle)}/{lane.capacity}"
            for kind, lane in self._lanes.items()
        )
        waiting = sum(lane.waiting for lane in self._lanes.values())
        return (
            f"<CudaStreamPool {self._backend.name}:{self.device} {parts} leased, {waiting} waiting>"
        )

    def trace(self) -> contextlib.AbstractContextManager[Trace]:
        """Record a device-timed span per lease until the ``with`` block ends.

        ``with pool.trace() as t: ...``, then ``t.spans``,
        ``t.save_chrome_trace("run.trace.json")`` (Perfetto) or
        ``t.save_timeline("timeline.png")``. One trace at a time per pool; an
        untraced pool pays nothing (see ``cupystreams._trace``).
        """
        from ._trace import trace_pool

        return trace_pool(self)


def _mark_closed(streams: list[PooledStream]) -> None:
    for stream in streams:
        stream.state = StreamState.CLOSED


def _after_fork_in_child() -> None:
    forget_parked()
    for pool in list(_live_pools):
        pool._forked = True
        pool._closed = True
        # A parent thread may have held the lock at fork time; never wait on it.
        pool._lock = threading.RLock()
        for lane in pool._lanes.values():
            lane.lock = pool._lock
        pool._keys.changed = threading.Condition(pool._lock)
        pool._finalizer.detach()  # the parent's CUDA handles are not ours to destroy
        pool.events._closed_reason = _FORKED
        pool.events._lock = threading.RLock()
        for lane in pool._lanes.values():
            lane.waiters.clear()  # the parent's waiting threads do not exist here
        _mark_closed(pool._streams)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
