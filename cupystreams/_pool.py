"""CudaStreamPool: exclusive leases on long-lived streams, grouped by kind."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

from ._affinity import AffinityTable
from ._backends import make_backend
from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError
from ._events import EventPool, PooledEvent
from ._lease import StreamLease, new_lease
from ._stats import KindStats, PoolStats, StreamStats
from ._stream import PooledStream
from ._types import StreamKind, StreamPriority, StreamState

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["CudaStreamPool"]

_SIZE_ARGUMENT = {
    StreamKind.COMPUTE: "compute_streams",
    StreamKind.COMM: "comm_streams",
    StreamKind.HIGH_PRIORITY: "high_priority_streams",
}
_live_pools: weakref.WeakSet[CudaStreamPool] = weakref.WeakSet()
_queue_warning_given = False


class _Waiter:
    """A thread blocked in acquire; a releaser hands it a stream directly."""

    __slots__ = ("closed", "ready", "stream")

    def __init__(self) -> None:
        self.stream: PooledStream | None = None
        self.closed = False
        self.ready = threading.Event()


class _Lane:
    """The streams of one kind: idle ones in a deque, waiters in FIFO order."""

    __slots__ = ("capacity", "idle", "kind", "streams", "waiters")

    def __init__(self, kind: StreamKind, streams: list[PooledStream]) -> None:
        self.kind = kind
        self.streams = streams
        self.capacity = len(streams)
        self.idle: deque[PooledStream] = deque(streams)
        self.waiters: deque[_Waiter] = deque()


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout={timeout!r} must be a number of seconds or None")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout={timeout!r} must be >= 0 seconds, or None to wait for ever")
    return None if math.isinf(timeout) else float(timeout)


def _destroy_streams(backend: Backend, streams: list[PooledStream]) -> None:
    # A factory-free finalizer target: it captures the backend and the
    # streams, never the pool, so the pool can be collected.
    for stream in streams:
        if stream.state is not StreamState.CLOSED:
            stream.state = StreamState.CLOSED
            backend.destroy_stream(stream._handle)


class CudaStreamPool:
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
        sizes = {
            kind: _check_count(name, value)
            for kind, name, value in (
                (StreamKind.COMPUTE, "compute_streams", compute_streams),
                (StreamKind.COMM, "comm_streams", comm_streams),
                (StreamKind.HIGH_PRIORITY, "high_priority_streams", high_priority_streams),
            )
        }
        if sum(sizes.values()) == 0:
            raise ValueError("a pool needs at least one stream; all three sizes are 0")
        _check_count("event_pool_size", event_pool_size)
        if _check_count("max_affinity_keys", max_affinity_keys) == 0:
            raise ValueError("max_affinity_keys=0 leaves no room for keys; pass at least 1")
        for name, flag in (("enable_affinity", enable_affinity), ("non_blocking", non_blocking)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r} must be a bool")

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
        self._lanes: dict[StreamKind, _Lane] = {}
        for kind, count in sizes.items():
            priority = high if kind is StreamKind.HIGH_PRIORITY else least
            streams = [
                PooledStream._create(
                    self, self._backend, len(self._streams) + i, kind, priority, non_blocking
                )
                for i in range(count)
            ]
            self._streams.extend(streams)
            self._lanes[kind] = lane = _Lane(kind, streams)
            for stream in streams:
                stream._lane = lane
        self._compute = self._lanes[StreamKind.COMPUTE]
        self._comm = self._lanes[StreamKind.COMM]
        self._high = self._lanes[StreamKind.HIGH_PRIORITY]
        self._finalizer = weakref.finalize(self, _destroy_streams, self._backend, self._streams)
        self._finalizer.atexit = False  # no CUDA calls while the interpreter shuts down
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

    def acquire_compute(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease:
        """Lease a compute stream.

        Args:
            affinity_key: Orders this lease after every earlier lease with the
                same key, on whatever stream it gets; at most one live lease
                per key.
            blocking: Wait for a stream (first come, first served); False
                raises ``PoolExhaustedError`` at once when none is idle.
            timeout: Seconds to wait at most (None: no limit).

        Raises:
            PoolExhaustedError, PoolTimeoutError, PoolClosedError, LeaseError.
        """
        lane = self._compute
        if affinity_key is None and timeout is None and not lane.waiters and not self._closed:
            try:
                return new_lease(lane.idle.pop(), None)
            except IndexError:
                pass
        return self._acquire(lane, affinity_key, blocking, timeout)

    def acquire_comm(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease:
        """Lease a communication stream; arguments as ``acquire_compute``."""
        lane = self._comm
        if affinity_key is None and timeout is None and not lane.waiters and not self._closed:
            try:
                return new_lease(lane.idle.pop(), None)
            except IndexError:
                pass
        return self._acquire(lane, affinity_key, blocking, timeout)

    def acquire_high_priority(
        self, blocking: bool = True, timeout: float | None = None
    ) -> StreamLease:
        """Lease a high-priority stream; arguments as ``acquire_compute``."""
        lane = self._high
        if timeout is None and not lane.waiters and not self._closed:
            try:
                return new_lease(lane.idle.pop(), None)
            except IndexError:
                pass
        return self._acquire(lane, None, blocking, timeout)

    def _acquire(
        self, lane: _Lane, key: Hashable | None, blocking: object, timeout: object
    ) -> StreamLease:
        if not isinstance(blocking, bool):
            raise TypeError(f"blocking={blocking!r} must be a bool")
        seconds = _check_timeout(timeout)
        if key is not None:
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"affinity_key={key!r} must be hashable") from None
        if self._closed:
            raise self._closed_error()
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
        self, lane: _Lane, key: Hashable, blocking: bool, deadline: float | None
    ) -> StreamLease:
        with self._lock:
            try:
                state = self._keys.reserve(
                    key, threading.get_ident(), blocking, deadline, lambda: self._closed
                )
            except PoolTimeoutError:
                self._timeouts += 1
                raise
            except PoolExhaustedError:
                self._exhaustions += 1
                raise
        previous = state.last_stream
        prefer = previous if self.enable_affinity and previous in lane.streams else None
        try:
            stream = self._take(lane, blocking, deadline, prefer)
        except BaseException:
            with self._lock:
                self._keys.unreserve(key, state)
            raise
        if stream is previous:
            stream._affinity_hits += 1  # same stream: stream order already holds
        elif state.last_event is not None:
            # The key moves: its earlier work must finish before this lease's.
            self._backend.wait_event(stream._handle, state.last_event._handle)
            stream._waits += 1
        return new_lease(stream, key)

    def _take(
        self, lane: _Lane, blocking: bool, deadline: float | None, prefer: PooledStream | None
    ) -> PooledStream:
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if not lane.waiters:
                if prefer is not None:
                    try:
                        lane.idle.remove(prefer)
                        return prefer
                    except ValueError:
                        pass
                try:
                    return lane.idle.pop()
                except IndexError:
                    pass
            if not blocking:
                self._exhaustions += 1
                raise PoolExhaustedError(
                    f"no idle {lane.kind.value} stream ({lane.capacity} all leased); "
                    "wait with blocking=True or create the pool with more streams"
                )
            waiter = _Waiter()
            lane.waiters.append(waiter)
            self._hand_off(lane)  # a lock-free release may have raced our check
        finished = False
        try:
            waiter.ready.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            finished = True
        finally:
            with self._lock:
                stream = waiter.stream
                if stream is None:
                    with contextlib.suppress(ValueError):
                        lane.waiters.remove(waiter)
            if not finished and stream is not None:
                self._return(lane, stream)  # interrupted after the hand-off
        if stream is not None:
            return stream
        if waiter.closed:
            raise self._closed_error()
        with self._lock:
            self._timeouts += 1
        raise PoolTimeoutError(
            f"no {lane.kind.value} stream became idle within the timeout "
            f"({lane.capacity} streams, all leased); raise timeout= or the pool size"
        )

    def _hand_off(self, lane: _Lane) -> None:
        """Give idle streams to waiters, oldest first; needs the lock held."""
        while lane.waiters and lane.idle:
            waiter = lane.waiters.popleft()
            waiter.stream = lane.idle.pop()
            waiter.ready.set()

    def _hand_off_locked(self, lane: _Lane) -> None:
        with self._lock:
            self._hand_off(lane)

    def _return(self, lane: _Lane, stream: PooledStream) -> None:
        # Append first, then look for waiters: a waiter that registered after
        # our look re-checks the idle deque under the lock (see _take).
        lane.idle.append(stream)
        if lane.waiters:
            self._hand_off_locked(lane)

    def _closed_error(self) -> PoolClosedError:
        if self._forked:
            return PoolClosedError(
                "this pool was created before fork(); CUDA streams do not survive fork, "
                "so create a new pool in the child process"
            )
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
        if lease._slot and lease._slot[0]._pool is not self:
            raise LeaseError("this lease was issued by another pool; release it there")
        lease.release()

    def _release_slow(self, lease: StreamLease, stream: PooledStream) -> None:
        """Release a lease that is keyed, capturing, or outlived its pool."""
        if stream.state is StreamState.CLOSED:
            lease._slot.clear()  # the pool closed under the lease: nothing to return
            return
        if stream._capturing is not None and stream._capturing():
            raise LeaseError(
                f"{stream!r} is still capturing a CUDA graph; end the capture, then release"
            )
        key = lease._key
        # A keyed lease's end is recorded before the stream can be re-leased,
        # so the record never lands in a later holder's work or graph capture.
        event = self._end_of_work(stream) if key is not None else None
        try:
            lease._slot.pop()
        except IndexError:
            if event is not None:
                self.events.release(event)
            raise LeaseError("this lease was already released") from None
        stream._active_ns += time.perf_counter_ns() - stream._lease_start
        stream.state = StreamState.IDLE
        self._return(stream._lane, stream)
        if event is not None:
            with self._lock:
                stale = self._keys.finish(key, stream, event)
            for old in stale:
                self.events.release(old)

    def _end_of_work(self, stream: PooledStream) -> PooledEvent:
        event = self.events.acquire()
        self._backend.record(event._handle, stream._handle)
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
            event.record(lease_or_stream)
        except BaseException:
            self.events.release(event)
            raise
        return event

    def sync_all(self) -> None:
        """Block until the work on every pool stream is done."""
        if self._closed:
            raise self._closed_error()
        for stream in self._streams:
            stream.synchronize()

    def stats(self) -> PoolStats:
        """A consistent, frozen snapshot of the pool's occupancy and counters."""
        with self._lock:
            kinds = {
                kind: KindStats(
                    capacity=lane.capacity,
                    leased=0 if self._closed else lane.capacity - len(lane.idle),
                    idle=0 if self._closed else len(lane.idle),
                    waiting=len(lane.waiters),
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
                while lane.waiters:
                    waiter = lane.waiters.popleft()
                    waiter.closed = True
                    waiter.ready.set()
                lane.idle.clear()
            key_events = self._keys.clear()
        for event in key_events:
            self.events.release(event)
        self._finalizer()
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
        waiting = sum(len(lane.waiters) for lane in self._lanes.values())
        return (
            f"<CudaStreamPool {self._backend.name}:{self.device} {parts} leased, {waiting} waiting>"
        )


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._forked = True
        pool._closed = True
        pool._lock = threading.RLock()
        pool._finalizer.detach()  # the parent's CUDA handles are not ours to destroy
        for stream in pool._streams:
            stream.state = StreamState.CLOSED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
