"""``pool.capture(origin)``: CUDA graphs whose side work runs on pooled leases.

The rules (``CudaStreamPool.capture`` and the README say the same to users):

1. **Joining.** Inside ``with pool.capture(origin):`` every lease that the
   same thread acquires from the pool joins the capture: its stream waits on
   an event recorded on ``origin``, which pulls it into the capture (CUDA's
   cross-stream capture) after the origin's work so far. Other threads'
   acquires are not affected. ``affinity_key`` is refused inside a capture:
   ordering a key's work against leases outside the capture would make a
   captured stream wait on work outside it, which CUDA forbids.
2. **Joining back.** Releasing a joined lease makes the origin wait on an
   event recorded on the lease's stream. CUDA keeps a stream that joined a
   capture in capture mode until the capture ends, so its stream does not go
   back to the idle list, where another thread would queue work into the
   graph: it stays with the capture ("parked"). A later acquire of the same
   kind on the capturing thread takes a parked stream first (joined again,
   after its earlier work), so a loop of leases needs no more streams than
   are held at once. Parked streams go back to the pool through the normal
   release once the capture has ended.
3. **Ending.** Leases still joined when the block ends are joined back, the
   capture is ended cleanly (no stream is left capturing, the pool stays
   usable, no graph is kept) and ``LeaseError`` names each lease and where it
   was acquired; they are plain leases from then on. A capture begun here
   yields a ``CapturedGraph``. On an origin that is capturing already (a
   torch stream inside ``torch.cuda.graph``, another framework's capture)
   the block yields None, the other framework ends the capture, and the
   parked streams go back once it has (a short-lived thread of the library,
   ``cupystreams-capture-end``, watches them).
4. **Nothing that breaks a capture.** From the start of the block until the
   capture has ended, the device's event pools create no event and pools are
   neither created nor closed there (``_capturing``), and the pool's
   ``sync_all()`` is refused; a capture fills its pool's idle events up to
   ``event_pool_size`` before it begins. Joined
   leases refuse ``synchronize()`` and ``query()`` and a ``wait()`` on work
   outside the capture, each of which CUDA would answer by invalidating it.
5. **One capture per pool and thread**: blocks do not nest. A pool is
   either traced or capturing.

While a capture runs, the pool's ``acquire_*`` and ``*_context`` methods are
shadowed by instance attributes that route this thread's acquires to its
capture, as ``pool.trace()`` does; they are deleted when the pool's last
capture ends, so a pool with no capture runs its plain methods.

Locking:

| lock | guards |
| --- | --- |
| ``PoolCaptures.lock`` | ``active``, ``pending``, ``watches`` and the pool's shadowing attributes |
| ``Capture._lock`` | ``_joined``, ``_parked``, ``_ended`` |
| ``_Watch._lock`` | ``_holders``, ``_done`` |
| (thread-local) | ``PoolCaptures.local.capture``: read and written by its own thread only |

A ``_Watch`` gives its streams back (taking the pool's lock, and asking the
device whether they still capture) under its own lock, which nothing else
takes; no other lock here is held while another lock of the library is
taken or the device is called. A stream changes hands between a lease and
the capture's holder under the pool's lock (``_hand_over``), as a release does.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from . import _capturing
from ._errors import LeaseError, PoolError
from ._events import PooledEvent
from ._graph import CapturedGraph
from ._lease import StreamLease
from ._stream_args import pooled_source, resolve_stream
from ._types import StreamKind
from ._validate import check_wait

if TYPE_CHECKING:
    from ._backends import Backend
    from ._core import PoolCore
    from ._lanes import Lane
    from ._pool import CudaStreamPool
    from ._stream import PooledStream

__all__ = ["Capture", "PoolCaptures"]

# The pool's methods a capture routes: (kind of stream, is it a *_context method).
_ROUTED = {
    "acquire_compute": (StreamKind.COMPUTE, False),
    "acquire_comm": (StreamKind.COMM, False),
    "acquire_high_priority": (StreamKind.HIGH_PRIORITY, False),
    "compute_context": (StreamKind.COMPUTE, True),
    "comm_context": (StreamKind.COMM, True),
    "high_priority_context": (StreamKind.HIGH_PRIORITY, True),
}
# How often a watcher looks whether another framework's capture has ended.
_WATCH_FIRST_S = 1e-4
_WATCH_MAX_S = 5e-3


class PoolCaptures:
    """The captures in progress on one pool (``CudaStreamPool._captures``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0  # capture blocks running (any thread)
        self.pending = 0  # captures ended whose parked streams are not all back yet
        self.watches: list[_Watch] = []  # their parked streams
        self.local = threading.local()  # .capture: this thread's Capture, if any

    def busy(self) -> bool:
        """True while a capture block runs or its streams are still capturing."""
        self.settle()
        with self.lock:
            return bool(self.active or self.pending)

    def settle(self) -> None:
        """Give back now the parked streams whose capture has ended."""
        with self.lock:
            watches = list(self.watches)
        for watch in watches:
            watch.poll()


class _Joined:
    """A lease joined to a capture: where it was acquired, and its join-back event."""

    __slots__ = ("back", "lease", "where")

    def __init__(self, lease: StreamLease, where: str, back: PooledEvent) -> None:
        self.lease = lease
        self.where = where
        self.back = back


class Capture:
    """One ``pool.capture(origin)`` block; the rules are in the module docstring."""

    def __init__(self, pool: CudaStreamPool, origin: object) -> None:
        core = pool._core
        if (error := core.closed_error()) is not None:
            raise error
        # Held during the block only: whoever keeps the capture object after
        # its block must not keep the pool.
        self._pool: CudaStreamPool | None = pool
        self._captures = pool._captures
        self._core: PoolCore = core
        self._backend: Backend = pool._backend
        self._events = pool.events
        self._origin = _origin_handle(pool._backend, origin)
        self._origin_repr = repr(origin)
        self._graph: CapturedGraph | None = None
        self._begun = False
        self._entered = False
        self._lock = threading.Lock()
        self._joined: dict[int, _Joined] = {}
        self._parked: dict[StreamKind, list[StreamLease]] = {}
        self._ended = False
        self._leases = _joined_lease_class(self)

    # -- the block -------------------------------------------------------------

    def __enter__(self) -> CapturedGraph | None:
        if self._entered:
            raise PoolError("a pool.capture() block is entered once; call pool.capture() again")
        self._entered = True
        pool, captures, backend = self._pool, self._captures, self._backend
        assert pool is not None  # dropped only when the block ends
        if getattr(captures.local, "capture", None) is not None:
            raise PoolError(
                "this thread is capturing with this pool already: pool.capture() blocks do "
                "not nest (leases acquired in the outer block join its capture)"
            )
        external = backend.is_capturing(self._origin)
        if not external:
            self._events._fill_idle()  # the last moment at which creating events is safe
        _shadow_acquires(pool)
        _capturing.begin(backend)
        try:
            if not external:
                self._graph = CapturedGraph._create(backend)
                backend.begin_capture(self._origin)
                self._begun = True
        except BaseException:
            _capturing.end(backend)
            _unshadow_acquires(pool)
            raise
        captures.local.capture = self
        return self._graph

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        assert pool is not None  # entered once
        self._captures.local.capture = None  # this thread's acquires are plain again
        try:
            failure = self._end(body_failed=exc is not None)
        finally:
            _unshadow_acquires(pool)
        if failure is not None and exc is None:
            try:
                raise failure
            finally:
                del failure  # see the end of _end

    def _end(self, body_failed: bool) -> BaseException | None:
        """End the capture whatever happened; return the error to raise, if any."""
        with self._lock:
            self._ended = True
            left = list(self._joined.values())
            self._joined.clear()
        first_error: BaseException | None = None
        for entry in left:
            entry.lease.__class__ = StreamLease  # a plain lease from now on
            try:
                self._join_back(entry.lease._stream, entry.back)
            except BaseException as error:
                first_error = first_error or error
        graph: Any = None
        if self._begun:
            try:
                graph = self._backend.end_capture(self._origin)
            except BaseException as error:
                first_error = first_error or error
        with self._lock:
            parked = [holder for holders in self._parked.values() for holder in holders]
            self._parked.clear()
        try:
            self._give_back(parked)
        except BaseException as error:
            first_error = first_error or error

        failure: BaseException | None = first_error
        if failure is None and left:
            failure = LeaseError(self._left_message(left))
        if self._graph is not None:
            why = None
            if failure is not None:
                why = str(failure) if left else f"{type(failure).__name__}: {failure}"
            elif body_failed:
                why = "its with block raised"
            self._graph._finish(graph, why)
        try:
            return failure
        finally:
            # The error's traceback holds this frame, which must not hold the
            # error: a cycle only the collector breaks would keep every frame
            # of the call, and the pool in the caller's.
            del failure, first_error

    def _left_message(self, left: list[_Joined]) -> str:
        leases = "; ".join(f"{entry.lease!r} acquired at {entry.where}" for entry in left)
        ending = (
            "ended it (no graph was kept)"
            if self._begun
            else f"let the capture on origin={self._origin_repr} end"
        )
        return (
            f"pool.capture() ended with {len(left)} lease(s) still joined, which a CUDA "
            f"graph capture cannot end with: {leases}. The pool joined them back and "
            f"{ending}; they are plain leases now. Release each lease joined to a capture "
            "(a with block does it) before the capture's block ends"
        )

    # -- leases ----------------------------------------------------------------

    def acquire(
        self, lane: Lane, key: Hashable | None, blocking: object, timeout: object, where: str
    ) -> StreamLease:
        """A lease for this thread, joined to the capture (the routed acquire methods)."""
        if key is not None:
            raise ValueError(
                f"affinity_key={key!r} cannot be used inside pool.capture(): a key orders "
                "its work after leases outside the capture, and CUDA forbids a captured "
                "stream to wait for work outside its capture; acquire without a key (the "
                "capture orders its leases after the origin's work)"
            )
        check_wait(blocking, timeout)
        with self._lock:
            parked = self._parked.get(lane.kind)
            lease = parked.pop() if parked else None
        if lease is None:
            lease = self._core.acquire(lane, None, blocking, timeout)
        else:
            stream = lease._stream
            assert stream is not None  # a holder's stream, leased to the capture
            with self._core:
                stream._acquisitions += 1  # a lease handed out, for the statistics
                lease._serial = stream._acquisitions
        try:
            back = self._fork(lease)
        except BaseException:
            self._put_back(lease)
            raise
        lease.__class__ = self._leases
        with self._lock:
            self._joined[id(lease)] = _Joined(lease, where, back)
        return lease

    def _fork(self, lease: StreamLease) -> PooledEvent:
        """Join ``lease``'s stream to the capture; return the event its join-back will use."""
        stream = lease._stream
        assert stream is not None
        events, backend = self._events, self._backend
        # Taken first, so that a release never lacks one and a failure here
        # comes before the stream has joined (which cannot be undone).
        back = events.acquire()
        try:
            fork = events.acquire()
        except BaseException:
            events.release(back)
            raise
        try:
            backend.record(fork._handle, self._origin)
            backend.wait_event(stream._handle, fork._handle)  # the stream joins the capture
        except BaseException:
            events.release(back)
            raise
        finally:
            events.release(fork)  # CUDA takes the event's state at the wait
        return back

    def _join_back(self, stream: PooledStream | None, back: PooledEvent) -> None:
        assert stream is not None  # a joined lease cannot be released by the core
        backend = self._backend
        try:
            backend.record(back._handle, stream._handle)
            backend.wait_event(self._origin, back._handle)  # join back: the origin waits for it
        finally:
            self._events.release(back)

    def release(self, lease: StreamLease) -> None:
        """End a joined lease: join it back and keep its stream with the capture."""
        stream = lease._stream
        if stream is None:
            raise LeaseError("this lease was already released")
        with self._lock:
            entry = self._joined.pop(id(lease), None)
        if entry is None:  # another thread's release won, or the capture just ended
            StreamLease.release(lease)
            return
        try:
            self._join_back(stream, entry.back)
        finally:
            # Joined back or not, the stream is in the capture until it ends.
            holder = self._hand_over(lease, stream)
            lease.__class__ = StreamLease
            self._put_back(holder)

    def _hand_over(self, lease: StreamLease, stream: PooledStream) -> StreamLease:
        """Move ``stream`` from the user's ``lease`` (released so) to a holder of the capture."""
        holder: StreamLease = object.__new__(StreamLease)
        holder._entered = None
        holder._key = None
        holder._key_state = None
        with self._core:
            if lease._stream is not stream:
                raise LeaseError("this lease was already released")
            holder._serial = lease._serial
            holder._stream = stream
            lease._stream = None
        return holder

    def _put_back(self, lease: StreamLease) -> None:
        """Park a lease's stream with the capture, or give it back if it never joined."""
        stream = lease._stream
        assert stream is not None
        if not _capturing_now(stream):
            StreamLease.release(lease)  # it never joined: the plain release
            return
        with self._lock:
            if not self._ended:
                self._parked.setdefault(stream.kind, []).append(lease)
                return
        self._give_back([lease], count=False)  # released while the capture ended

    def check_inside(self, other: object) -> None:
        """Refuse a ``wait`` on work outside the capture (CUDA invalidates the capture)."""
        if isinstance(other, PooledEvent):
            return  # recorded inside or outside: only CUDA knows
        source = pooled_source(other)
        backend = self._backend if source is None else source._backend
        handle = resolve_stream(backend, other, "other") if source is None else source._handle
        # The runtime's check first: it also answers for the legacy stream, on
        # a thread with no current context, where the driver's id call fails.
        if not backend.is_capturing(handle):
            where = "any capture"
        elif backend.capture_id(handle) != self._backend.capture_id(self._origin):
            where = "this capture (it is in another)"
        else:
            return
        raise LeaseError(
            f"other={other!r} is not part of {where}: CUDA forbids a captured stream "
            "to wait for work outside its capture (the capture would be "
            "invalidated); make the origin wait for it before the capture begins, or "
            "acquire the producer inside the capture"
        )

    # -- the end ---------------------------------------------------------------

    def _give_back(self, holders: list[StreamLease], count: bool = True) -> None:
        """Return parked streams to the pool once their capture has ended.

        Those of a capture that another framework still runs are handed to a
        ``_Watch``; ``count`` says whether this call ends the capture's entry
        in the device's registry (now, or when the watch is done).
        """
        backend, captures = self._backend, self._captures
        watch = _Watch(self._core, holders)

        def done() -> None:
            if count:
                _capturing.end(backend)  # first: a pool that is not busy has ended it
            with captures.lock:
                captures.pending -= 1
                captures.watches.remove(watch)

        with captures.lock:
            captures.pending += 1
            captures.watches.append(watch)
        if not watch.poll(done):
            threading.Thread(
                target=watch.run, name=f"cupystreams-capture-end-{backend.device}", daemon=True
            ).start()


class _Watch:
    """Parked streams of a capture another framework still runs: given back once it ends.

    ``poll`` gives back those whose capture has ended; a watcher thread of the
    library polls until all are back, and ``close()`` / ``sync_all()`` poll
    first, so that they never refuse a pool whose capture has just ended.
    """

    def __init__(self, core: PoolCore, holders: list[StreamLease]) -> None:
        self._core = core
        self._lock = threading.Lock()
        self._holders = holders
        self._done: Callable[[], None] | None = None

    def poll(self, done: Callable[[], None] | None = None) -> bool:
        """Give back what can go; True once everything is back (``done`` then runs once)."""
        with self._lock:
            if done is not None:
                self._done = done
            core = self._core
            for holder in list(self._holders):
                stream = holder._stream
                assert stream is not None
                if core.closed_reason is None and _capturing_now(stream):
                    continue
                self._holders.remove(holder)
                core.release(holder, stream)
            if self._holders or self._done is None:
                return not self._holders
            finish, self._done = self._done, None
        finish()
        return True

    def run(self) -> None:
        """The watcher thread: poll, less and less often, until everything is back."""
        delay = _WATCH_FIRST_S
        try:
            while not self.poll():
                time.sleep(delay)
                delay = min(2 * delay, _WATCH_MAX_S)
        finally:
            # Even after an error (its streams then stay leased), the device
            # must not stay "capturing" for ever.
            with self._lock:
                self._holders.clear()
            self.poll()


def _capturing_now(stream: PooledStream) -> bool:
    probe = stream._capture_probe
    return probe is not None and bool(probe())


def _joined_lease_class(capture: Capture) -> type[StreamLease]:
    # Weakly: a class is in a reference cycle of its own, which would keep the
    # capture (its graph, its origin, the pool's core) until the collector runs.
    # A lease is joined only while the capture lives; a method that raced the
    # end of the block (and its class switch) finds a plain lease.
    capture_ref = weakref.ref(capture)

    class JoinedLease(StreamLease):
        """A lease joined to a capture: its work is captured, not run."""

        __slots__ = ()  # the same layout, so a lease's class can be switched

        def release(self) -> None:
            joined = capture_ref()
            if joined is None:
                StreamLease.release(self)
            else:
                joined.release(self)

        def synchronize(self) -> None:
            self._live()
            raise LeaseError(_NOT_RUN.format(what="synchronized"))

        def query(self) -> bool:
            self._live()
            raise LeaseError(_NOT_RUN.format(what="queried"))

        def wait(self, other: object) -> None:
            self._live()
            joined = capture_ref()
            if joined is not None:
                joined.check_inside(other)
            StreamLease.wait(self, other)

        def __repr__(self) -> str:
            return StreamLease.__repr__(self).replace("<StreamLease", "<StreamLease joined", 1)

    return JoinedLease


_NOT_RUN = (
    "this lease is joined to a CUDA graph capture: its work is recorded, not run, so it "
    "cannot be {what} (CUDA would invalidate the capture); launch the graph, then "
    "synchronize the stream it runs on"
)


def _origin_handle(backend: Backend, origin: object) -> Any:
    """The backend's handle of the capture's origin, checked."""
    pooled = pooled_source(origin)
    if pooled is not None and pooled._backend.name != backend.name:
        raise TypeError(
            f"origin={origin!r} is a stream of a pool on the {pooled._backend.name} backend, "
            f"and this pool runs on the {backend.name} backend; pass a stream of this "
            "pool's backend"
        )
    device = pooled._backend.device if pooled is not None else _device_of(origin)
    if device is not None and device != backend.device:
        raise ValueError(
            f"origin={origin!r} is a stream of device {device}, but this pool's leases live "
            f"on device {backend.device}, and a lease on another device cannot join a "
            f"capture there; capture with a pool of device {device} "
            f"(CudaStreamPool(device={device}), or get_global_stream_pool() with that "
            "device current)"
        )
    handle = resolve_stream(backend, origin, "origin")
    # 0 and 1: cudaStreamLegacy's two names.
    if handle is backend.default_stream() or getattr(handle, "ptr", None) in (0, 1):
        raise ValueError(
            f"origin={origin!r} is the legacy default stream, which CUDA cannot capture; "
            "pass a lease (or another non-default stream) to capture on"
        )
    return handle


def _device_of(obj: object) -> int | None:
    """The device of a foreign stream when it says (CuPy's ``device_id``, torch's
    ``device_index``); None for a raw pointer, taken to be on the pool's device."""
    for name in ("device_id", "device_index"):
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _where(frame: FrameType | None) -> str:
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _shadow_acquires(pool: CudaStreamPool) -> None:
    """Route the pool's acquires through this thread's capture, if it has one."""
    captures = pool._captures
    with captures.lock:
        if captures.active == 0:
            if any(name in vars(pool) for name in _ROUTED):
                raise PoolError(
                    "this pool is being traced (pool.trace()); end the trace before capturing: "
                    "the trace's timing events would be captured into the graph"
                )
            core = pool._core
            for name, (kind, context) in _ROUTED.items():
                routed = _route(captures, core, core.lanes[kind], context)
                setattr(pool, name, functools.wraps(getattr(type(pool), name))(routed))
        captures.active += 1


def _unshadow_acquires(pool: CudaStreamPool) -> None:
    captures = pool._captures
    with captures.lock:
        captures.active -= 1
        if captures.active == 0:
            for name in _ROUTED:
                delattr(pool, name)


def _route(
    captures: PoolCaptures, core: PoolCore, lane: Lane, context: bool
) -> Callable[..., StreamLease]:
    """An acquire method of ``lane``'s kind that joins this thread's capture, if any.

    Built over the core, not the pool: the pool's attributes never lead back to it.
    """
    local, plain, getframe = captures.local, core.acquire, sys._getframe

    if context:

        def acquire_context(affinity_key: Hashable | None = None) -> StreamLease:
            capture: Capture | None = getattr(local, "capture", None)
            if capture is None:
                return plain(lane, affinity_key, True, None)
            return capture.acquire(lane, affinity_key, True, None, _where(getframe(1)))

        return acquire_context

    def acquire(
        affinity_key: Hashable | None = None, blocking: bool = True, timeout: float | None = None
    ) -> StreamLease:
        capture: Capture | None = getattr(local, "capture", None)
        if capture is None:
            return plain(lane, affinity_key, blocking, timeout)
        return capture.acquire(lane, affinity_key, blocking, timeout, _where(getframe(1)))

    return acquire
