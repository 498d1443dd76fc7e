"""CudaStreamPool: exclusive leases on long-lived streams, grouped by kind."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from . import _capturing
from ._backends import make_backend, resolve_backend_name
from ._capture import Capture, PoolCaptures
from ._core import FINALIZER_LOCK_WAIT_S, SIZE_ARGUMENT, PoolCore
from ._errors import LeaseError, PoolError
from ._events import EventPool, PooledEvent
from ._graph import CapturedGraph
from ._lease import StreamLease
from ._stats import KindStats, PoolStats, StreamStats
from ._stream import PooledStream
from ._types import StreamKind, StreamPriority
from ._validate import check_count, check_flag

if TYPE_CHECKING:
    from ._backends import Backend
    from ._trace import Trace

__all__ = ["CudaStreamPool"]

_live_pools: weakref.WeakSet[CudaStreamPool] = weakref.WeakSet()
_queue_warning_lock = threading.Lock()  # guards _queue_warning_given
_queue_warning_given = False
_CLOSED = "the pool is closed; create a new CudaStreamPool"
_DROPPED = "the pool was dropped without close() and has been closed"
_FORKED = (
    "this pool was created before fork(); CUDA streams do not survive fork, "
    "so create a new pool in the child process"
)


class CudaStreamPool:
    """A pool of long-lived CUDA streams handed out as exclusive leases.

    Streams come in three kinds, each with its own FIFO queue of waiters:
    compute and comm streams at CUDA's default (least) priority, and
    high-priority streams at the device's greatest priority. Every method is
    thread-safe.

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
        sizes = {kind: check_count(SIZE_ARGUMENT[kind], value) for kind, value in given.items()}
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

        # Checked before the backend is made: making one calls the driver.
        _capturing.refuse(
            resolve_backend_name(backend),
            device if isinstance(device, int) and not isinstance(device, bool) else None,
            "creating a CudaStreamPool (its streams and events)",
            "create the pool before the capture begins",
        )
        self._backend: Backend = make_backend(backend, device)
        least, greatest = self._backend.priority_range()
        high = _resolve_priority(high_priority, least, greatest)
        _warn_if_over_hardware_queues(self._backend, sum(sizes.values()))

        self.events = EventPool(
            initial_size=min(8, event_pool_size), max_size=event_pool_size, backend=self._backend
        )
        self._core = core = PoolCore(self._backend, self.events, max_affinity_keys, enable_affinity)
        self._streams: list[PooledStream] = []
        self._trace: Trace | None = None  # set by trace() for its with block
        self._captures = PoolCaptures()
        handles: list[Any] = []
        # Nothing here refers back to the pool, so a pool dropped without
        # close() is closed where its last reference goes. The core is held
        # weakly: its key table holds users' keys, which may lead back to the
        # pool, and a strong hold would keep such a pool for ever.
        self._finalizer = weakref.finalize(
            self, _close_dropped, weakref.ref(core), handles, self._backend, self.events
        )
        self._finalizer.atexit = False  # no CUDA calls while the interpreter shuts down
        try:
            for kind, count in sizes.items():
                lane = core.lanes[kind]
                priority = high if kind is StreamKind.HIGH_PRIORITY else least
                for _ in range(count):
                    stream = PooledStream._create(
                        core, lane, len(self._streams), priority, non_blocking
                    )
                    self._streams.append(stream)
                    handles.append(stream._handle)
                    with core:
                        lane.add_locked(stream)
        except BaseException:
            self._finalizer()  # a half-built pool leaves no stream behind
            raise
        self._compute = core.lanes[StreamKind.COMPUTE]
        self._comm = core.lanes[StreamKind.COMM]
        self._high = core.lanes[StreamKind.HIGH_PRIORITY]
        _live_pools.add(self)

    # -- properties ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after ``close()`` (or in a child process after ``fork``)."""
        return self._core.closed_reason is not None

    @property
    def device(self) -> int:
        """The device ordinal the pool's streams live on."""
        return self._backend.device

    @property
    def backend(self) -> str:
        """The backend's name: ``"cupy"`` or ``"host"``."""
        return self._backend.name

    @property
    def enable_affinity(self) -> bool:
        """Whether a keyed acquire prefers the stream its key used last."""
        return self._core.enable_affinity

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
            affinity_key: Orders leases with the same key: each runs after the
                previous one's work, on the same stream when it is idle.
                At most one live lease per key; a second acquire waits.
            blocking: Wait for a stream (False: raise at once).
            timeout: Seconds to wait at most (None: for ever). Only with
                ``blocking=True``.

        Raises:
            PoolExhaustedError: ``blocking=False`` and no stream (or the key) is free.
            PoolTimeoutError: Nothing became free within ``timeout``.
            PoolClosedError: The pool is or got closed.
            LeaseError: This thread already holds a lease with ``affinity_key``.
        """
        return self._core.acquire(self._compute, affinity_key, blocking, timeout)

    def acquire_comm(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease:
        """Lease a communication stream; arguments as ``acquire_compute``."""
        return self._core.acquire(self._comm, affinity_key, blocking, timeout)

    def acquire_high_priority(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease:
        """Lease a stream of the device's greatest priority; arguments as ``acquire_compute``."""
        return self._core.acquire(self._high, affinity_key, blocking, timeout)

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
        if stream is not None and stream._core is not self._core:
            raise LeaseError("this lease was issued by another pool; release it there")
        lease.release()

    # -- context managers --------------------------------------------------------

    def compute_context(self, affinity_key: Hashable | None = None) -> StreamLease:
        """Acquire a compute stream for a ``with`` block, current inside it.

        The lease itself is the context manager: ``with pool.compute_context()
        as lease:`` is ``with pool.acquire_compute() as lease:``.
        """
        return self._core.acquire(self._compute, affinity_key, True, None)

    def comm_context(self, affinity_key: Hashable | None = None) -> StreamLease:
        """Acquire a comm stream for a ``with`` block, current inside it."""
        return self._core.acquire(self._comm, affinity_key, True, None)

    def high_priority_context(self, affinity_key: Hashable | None = None) -> StreamLease:
        """Acquire a high-priority stream for a ``with`` block, current inside it."""
        return self._core.acquire(self._high, affinity_key, True, None)

    # -- whole-pool operations -------------------------------------------------

    def record_event(self, lease_or_stream: object = None) -> PooledEvent:
        """Record the work queued so far on a stream into an event of ``events``.

        Args:
            lease_or_stream: Anything accepted as a stream (0 is the legacy
                default stream), or None for the calling thread's current
                stream (the legacy default stream when none was made current).
        """
        event = self.events.acquire()
        try:
            event._record(lease_or_stream, "lease_or_stream")
        except BaseException:
            self.events.release(event)
            raise
        return event

    def sync_all(self) -> None:
        """Block until the work on every pool stream is done.

        Raises:
            PoolError: A CUDA graph capture of this pool is in progress (its
                streams cannot be synchronized without breaking it).
        """
        if (error := self._core.closed_error()) is not None:
            raise error
        if self._captures.busy():
            raise PoolError(
                "sync_all() would synchronize streams that are capturing a CUDA graph, "
                "which breaks the capture; call it after the capture has ended"
            )
        # Every stream is waited for even if one reports a host-function error.
        first_error: BaseException | None = None
        for stream in self._streams:
            try:
                stream.synchronize()
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            try:
                raise first_error
            finally:
                del first_error  # its traceback holds this frame, and the frame the pool

    def stats(self) -> PoolStats:
        """A consistent, frozen snapshot of the pool's occupancy and counters."""
        core = self._core
        with core:
            closed = core.closed_reason is not None
            kinds = {
                kind: KindStats(
                    capacity=lane.capacity,
                    leased=0 if closed else lane.capacity - len(lane.idle),
                    idle=0 if closed else len(lane.idle),
                    waiting=lane.waiting,
                )
                for kind, lane in core.lanes.items()
            }
            acquisitions = sum(stream._acquisitions for stream in self._streams)
            timeouts, exhaustions = core.timeouts, core.exhaustions
            key_events = core.keys.held_events()
        return PoolStats(
            compute=kinds[StreamKind.COMPUTE],
            comm=kinds[StreamKind.COMM],
            high_priority=kinds[StreamKind.HIGH_PRIORITY],
            acquisitions=acquisitions,
            timeouts=timeouts,
            exhaustions=exhaustions,
            events=self.events.stats(),
            key_events=key_events,
            closed=closed,
        )

    def stream_stats(self) -> list[StreamStats]:
        """One frozen ``StreamStats`` per pooled stream, in ``stream_id`` order."""
        return [stream.stats for stream in self._streams]

    def close(self) -> None:
        """Wait for the pool's work, destroy its streams and free their memory.

        Idempotent. Threads blocked in acquire get ``PoolClosedError``; leases
        still out become invalid (their methods raise ``PoolClosedError``, and
        their release is a no-op).

        Raises:
            PoolError: A CUDA graph capture of the pool's device is in progress:
                destroying streams may synchronize the device, which breaks it.
        """
        if self._core.closed_reason is None:
            self._captures.settle()  # a capture that has just ended is over
            _capturing.refuse(
                self._backend.name,
                self._backend.device,
                "closing a pool (destroying its streams)",
                "close it after the capture has ended",
            )
        _close_core(self._core, self.events, _CLOSED)
        self._finalizer.detach()

    def __enter__(self) -> CudaStreamPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        core = self._core
        if core.closed_reason is not None:
            return f"<CudaStreamPool {self._backend.name}:{self.device} closed>"
        stats = self.stats()
        parts = ", ".join(
            f"{kind} {figures.leased}/{figures.capacity}"
            for kind, figures in (
                ("compute", stats.compute),
                ("comm", stats.comm),
                ("high_priority", stats.high_priority),
            )
        )
        waiting = stats.compute.waiting + stats.comm.waiting + stats.high_priority.waiting
        return (
            f"<CudaStreamPool {self._backend.name}:{self.device} {parts} leased, {waiting} waiting>"
        )

    def capture(self, origin: object) -> contextlib.AbstractContextManager[CapturedGraph | None]:
        """Capture a CUDA graph on ``origin``, with side work on this pool's leases.

        ``with pool.capture(lease) as graph: ...``, then ``graph.launch(stream)``
        as often as needed, and ``graph.close()``. Inside the block:

        * A lease acquired from this pool on this thread joins the capture: its
          stream waits on an event recorded on ``origin``, so its work is
          captured after the origin's work so far. Other threads' acquires
          are not affected. ``affinity_key`` is refused (``ValueError``).
        * Releasing it joins it back (``origin`` waits on its work). Its
          stream stays with the capture, since CUDA keeps a stream that joined
          a capture capturing until the capture ends, and serves the next
          acquire of its kind on this thread; the pool gets it back when the
          capture has ended.
        * A joined lease cannot be synchronized or queried, nor wait for a
          lease or stream outside the capture (``LeaseError``): CUDA would
          invalidate the capture (as it does, unchecked, for a wait on an
          event recorded outside it).
        * The pool creates and destroys no stream and no event on its device
          (before it begins, a capture fills the idle events up to
          ``event_pool_size``; past them, acquiring an event raises
          ``PoolExhaustedError`` naming ``event_pool_size``), and
          ``sync_all()`` and ``close()`` are refused.

        When the block ends, a lease still joined is joined back, the capture
        ends cleanly (no graph is kept, the pool stays usable), and
        ``LeaseError`` names each such lease and where it was acquired.

        Args:
            origin: The stream to capture on: a lease, or any stream argument (a
                ``cupy.cuda.Stream``, an object with ``__cuda_stream__``, a raw
                pointer), but not the legacy default stream. If ``origin`` is
                capturing already (a torch stream inside ``torch.cuda.graph``),
                the capture is the other framework's: the block yields None,
                joins and joins back leases all the same, and its streams come
                back to the pool once that capture has ended.

        Returns:
            A context manager yielding the ``CapturedGraph`` (launchable once the
            block has ended), or None for a capture begun elsewhere.

        Raises:
            ValueError: ``origin`` is on another device than the pool (a lease
                on another device cannot join), or is the legacy default stream.
            TypeError: ``origin`` is not a stream.
            PoolError: This thread is capturing with this pool already (blocks do
                not nest), or the pool is being traced.
        """
        return Capture(self, origin)

    def trace(self) -> contextlib.AbstractContextManager[Trace]:
        """Record a device-timed span per lease until the ``with`` block ends.

        ``with pool.trace() as t: ...``, then ``t.spans``,
        ``t.save_chrome_trace("run.trace.json")`` (Perfetto) or
        ``t.save_timeline("timeline.png")``. One trace at a time per pool; an
        untraced pool pays nothing (see ``cupystreams._trace``).
        """
        from ._trace import trace_pool

        return trace_pool(self)


def _close_core(core: PoolCore, events: EventPool, reason: str, lock_wait: float = -1) -> None:
    """Close ``core``: wake waiters, wait for the streams' work, destroy them.

    A finalizer passes ``lock_wait`` (see ``PoolCore.close``): should it run
    out, the streams are freed with their last reference instead.
    """
    streams = core.close(reason, lock_wait)
    if streams:
        handles = []
        for stream in streams:
            handles.append(stream._handle)
            stream._handle = None
        _destroy(handles, core.backend, events, lock_wait)


def _close_dropped(
    core_ref: weakref.ref[PoolCore], handles: list[Any], backend: Backend, events: EventPool
) -> None:
    """The finalizer of a pool dropped without ``close()``."""
    core = core_ref()
    if core is not None:
        _close_core(core, events, _DROPPED, FINALIZER_LOCK_WAIT_S)
    else:
        # Collected with its core (a key leading back to the pool): nobody
        # can reach the pool's streams any more, so only their handles remain.
        _destroy(handles, backend, events, FINALIZER_LOCK_WAIT_S)


def _destroy(
    handles: list[Any], backend: Backend, events: EventPool, lock_wait: float = -1
) -> None:
    """Destroy every stream in ``handles``, then the backend's threads and the events.

    ``lock_wait`` bounds the waits for the backend's and the event pool's
    locks, as for the core's (a finalizer's call).

    Every stream is destroyed even if one fails (after a faulting kernel
    every CUDA call reports the error); the first failure is raised last.
    """
    first_error: BaseException | None = None
    while handles:
        try:
            backend.destroy_stream(handles.pop())
        except Exception as exc:
            first_error = first_error or exc
    try:
        backend.close(lock_wait)
    finally:
        events._close("the pool that owns this EventPool was closed", lock_wait)
    if first_error is not None:
        raise first_error


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


def _warn_if_over_hardware_queues(backend: Backend, total: int) -> None:
    global _queue_warning_given
    # Read even when a warning was given, so a bad value is always an error.
    queues = backend.hardware_queues()
    if queues is None or total <= queues:
        return
    with _queue_warning_lock:
        if _queue_warning_given:
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


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        core = pool._core
        # A parent thread may have held the lock at fork time; never wait on it.
        core.lock = threading.Lock()
        core.keys.changed = threading.Condition(core.lock)
        core.closed_reason = core.closed_reason or _FORKED
        for lane in core.lanes.values():
            lane.waiters.clear()  # the parent's waiting threads do not exist here
            lane.idle.clear()
        pool._finalizer.detach()  # the parent's CUDA handles are not ours to destroy
        pool._captures = PoolCaptures()  # the parent's captures do not exist here
        pool.events._lock = threading.Lock()
        pool.events._closed_reason = _FORKED


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
