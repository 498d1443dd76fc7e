"""PoolCore: a pool's shared state, and every rule that changes it.

Each rule is one method: take a stream (``_lease_out_locked``), give one back
(``_give_back_locked``, which hands it to the oldest waiter if any), end a
lease (``release``), return a dropped lease's stream (``_drain_dropped_locked``),
close. ``CudaStreamPool`` is the public face; streams and leases refer to
this object, never to the pool, so a pool dropped without ``close()`` is freed
where it is dropped (its finalizer closes the core).

Locking: one ``threading.Lock`` per pool, ``PoolCore.lock``. It guards:

| what | fields |
| --- | --- |
| this object | ``closed_reason``, ``timeouts``, ``exhaustions`` |
| each ``Lane`` | ``idle``, ``waiters``, ``key_waiting``, ``streams`` |
| each ``PooledStream`` | ``state``, ``_unrecorded_key``, ``_host_errors`` and |
| | its counters (``_acquisitions``, ``_lease_start``, ``_active_ns``, ...) |
| each ``StreamLease`` | ``_stream`` (cleared under it by the one release that wins) |
| the ``AffinityTable`` | all of it (its condition ``changed`` is over this lock) |

``dropped`` is a ``queue.SimpleQueue``, whose ``put`` is safe inside a
finalizer: a lease dropped without release is queued there and its stream
returned by the finalizer itself when it can take the lock, or else by the
thread that holds it (a collection inside one of its critical sections), as
it lets go: every holder leaves through ``unlock()`` (``with core:``), which
returns them first, and so does a thread before it sleeps. A thread waiting
for a stream sleeps without the lock, on its ``Waiter``'s own lock, which a
releaser opens once it has handed the stream over; a thread waiting for a key
sleeps on a condition over the lock. Under
the lock the pool calls only the backend's record / wait (to order a key's
work), its capture probe (a stream still capturing is not released, and a
dropped lease's stream that a capture pulled in stays queued until the
capture has ended; under the lock, close() cannot destroy the stream during
the query) and the event pool, whose lock is
taken inside this one and never the other way round.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Hashable
from time import perf_counter_ns
from typing import TYPE_CHECKING

from ._affinity import AffinityTable, KeyState
from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError
from ._lanes import Lane, Waiter
from ._lease import StreamLease
from ._types import StreamKind, StreamState
from ._validate import check_timeout as check_timeout_s
from ._validate import check_wait

if TYPE_CHECKING:
    from ._backends import Backend
    from ._events import EventPool
    from ._stream import PooledStream

__all__ = ["SIZE_ARGUMENT", "PoolCore"]

SIZE_ARGUMENT = {
    StreamKind.COMPUTE: "compute_streams",
    StreamKind.COMM: "comm_streams",
    StreamKind.HIGH_PRIORITY: "high_priority_streams",
}
# How long a finalizer waits for the lock before it leaves the dropped lease
# to the next holder: long enough for another thread's critical section, short
# enough when the finalizer interrupted this very thread's.
FINALIZER_LOCK_WAIT_S = 0.05
_LEASED = StreamState.LEASED
_IDLE = StreamState.IDLE
_get_ident = threading.get_ident
_new_lease = object.__new__


class PoolCore:
    """A pool's lanes, key table, event pool and counters under one lock."""

    def __init__(
        self, backend: Backend, events: EventPool, max_keys: int, enable_affinity: bool
    ) -> None:
        self.lock = threading.Lock()
        self.backend = backend
        self.events = events
        self.enable_affinity = enable_affinity
        self.keys = AffinityTable(max_keys, self.lock, events)
        self.lanes = {kind: Lane(kind) for kind in StreamKind}
        self.closed_reason: str | None = None
        self.timeouts = 0
        self.exhaustions = 0
        self.dropped: queue.SimpleQueue[tuple[PooledStream, KeyState | None]] = queue.SimpleQueue()

    def closed_error(self) -> PoolClosedError | None:
        """The error a use of the pool should raise now, or None while it is open."""
        reason = self.closed_reason
        return None if reason is None else PoolClosedError(reason)

    # -- acquire -------------------------------------------------------------

    def acquire(
        self, lane: Lane, key: Hashable | None, blocking: object, timeout: object
    ) -> StreamLease:
        """A lease on a stream of ``lane``; see ``CudaStreamPool.acquire_compute``."""
        # Checked without a function call while the arguments are the usual
        # ones: a valid timeout costs nothing until the caller has to wait.
        if (blocking is not True and blocking is not False) or (
            timeout is not None
            and (
                blocking is False
                or (type(timeout) is not float and type(timeout) is not int)
                or not timeout >= 0
            )
        ):
            check_wait(blocking, timeout)  # raises the error that names the argument
        # The lease is allocated before a stream is taken: nothing can fail
        # between taking the stream and handing it to the lease.
        lease = _new_lease(StreamLease)
        lease._stream = None
        lease._entered = None
        self.lock.acquire()
        try:
            if key is None and lane.idle and not lane.waiters and self.closed_reason is None:
                stream = lane.idle.pop()  # the uncontended case of _take_locked, inlined
                self._lease_out_locked(stream, None)
                state = None
            else:
                stream, state = self._take_locked(lane, key, blocking, timeout)  # type: ignore[arg-type]
            lease._key = key
            lease._key_state = state
            lease._serial = stream._acquisitions  # tags this lease's host-function errors
            lease._stream = stream
        finally:
            self.unlock()
        return lease

    def _take_locked(
        self, lane: Lane, key: Hashable | None, blocking: bool, timeout: float | None
    ) -> tuple[PooledStream, KeyState | None]:
        """Take a stream (and reserve the key) for a lease, waiting FIFO when it must."""
        if self.closed_reason is not None or not lane.capacity or not self.dropped.empty():
            self._check_takeable_locked(lane)
        # Only a caller that may wait pays for reading the clock.
        deadline = None if timeout is None else _deadline(timeout)
        state = None
        try:
            if key is not None:
                state = self.keys.reserve_locked(
                    key, _get_ident(), blocking, deadline, self._sleep_for_key_locked, lane
                )
            try:
                stream = None
                if not lane.waiters:
                    # The key's own stream when it is idle; otherwise the one
                    # keys want least (see Lane).
                    prefer = None if state is None else state.last_stream
                    if (
                        prefer is not None
                        and prefer.state is _IDLE
                        and prefer._lane is lane
                        and self.enable_affinity
                    ):
                        lane.idle.remove(prefer)
                        stream = prefer
                    elif lane.idle:
                        stream = lane.idle.pop()
                if stream is None:
                    if not blocking:
                        raise PoolExhaustedError(
                            f"no idle {lane.kind.value} stream ({lane.capacity} all leased); "
                            "wait with blocking=True or create the pool with more streams"
                        )
                    stream = self._wait_for_stream_locked(lane, deadline)
                self._lease_out_locked(stream, state)
                if state is not None:
                    if state.last_stream is stream and state.last_event is None:
                        stream._affinity_hits += 1  # its own stream: stream order holds
                    else:
                        self._begin_key_locked(state, stream)
            except BaseException:
                if state is not None:
                    self.keys.unreserve_locked(key, state)
                raise
        except PoolTimeoutError:
            self.timeouts += 1
            raise
        except PoolExhaustedError:
            self.exhaustions += 1
            raise
        return stream, state

    def _check_takeable_locked(self, lane: Lane) -> None:
        """Return dropped leases' streams; refuse a closed pool or a kind it has none of."""
        if not self.dropped.empty():
            self._drain_dropped_locked()
        if self.closed_reason is not None:
            raise PoolClosedError(self.closed_reason)
        if lane.capacity == 0:
            raise ValueError(
                f"this pool has no {lane.kind.value} streams; create it with "
                f"{SIZE_ARGUMENT[lane.kind]}=N (N > 0)"
            )

    def _begin_key_locked(self, state: KeyState, stream: PooledStream) -> None:
        """Order a key's lease that is not simply back on its own stream."""
        hit = state.last_stream is stream  # with a stale event from a stream that moved on
        try:
            moved = self.keys.begin_locked(state, stream)
        except BaseException:
            self._lease_back_locked(stream)
            raise
        stream._affinity_hits += hit
        stream._waits += moved  # this stream waits for the key's earlier work

    def _wait_for_stream_locked(self, lane: Lane, deadline: float | None) -> PooledStream:
        waiter = Waiter()
        lane.waiters.append(waiter)
        try:
            remaining = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self.unlock()  # asleep without it: releasers must get in
            try:
                waiter.ready.acquire(timeout=remaining)
            finally:
                self.lock.acquire()
        except BaseException:
            # Interrupted (KeyboardInterrupt, say): leave the queue, or pass on
            # a stream handed over meanwhile.
            if waiter.stream is None:
                if waiter in lane.waiters:  # close() may have taken it off already
                    lane.waiters.remove(waiter)
            elif self.closed_reason is None:
                self._give_back_locked(waiter.stream)
            raise
        if waiter.stream is None and not waiter.closed:
            lane.waiters.remove(waiter)
            raise PoolTimeoutError(
                f"no {lane.kind.value} stream became idle within the timeout "
                f"({lane.capacity} streams, all leased); raise timeout= or the pool size"
            )
        if (error := self.closed_error()) is not None:
            raise error  # closed while waiting, or just after a hand-off
        assert waiter.stream is not None
        return waiter.stream

    def _lease_out_locked(self, stream: PooledStream, state: KeyState | None) -> None:
        """Start a lease on ``stream``, just taken; on failure it goes back."""
        unrecorded = stream._unrecorded_key
        if unrecorded is not None and unrecorded is not state:
            try:
                # Another holder: the end of the key that left it must be kept first.
                self.keys.record_end_locked(unrecorded, stream)
            except BaseException:
                self._give_back_locked(stream)
                raise
        stream.state = _LEASED
        stream._acquisitions += 1
        stream._lease_start = perf_counter_ns()

    def _lease_back_locked(self, stream: PooledStream) -> None:
        """Undo ``_lease_out_locked`` after a later step of the acquire failed."""
        stream._acquisitions -= 1
        self._give_back_locked(stream)

    # -- release ---------------------------------------------------------------

    def release(self, lease: StreamLease, stream: PooledStream) -> None:
        """End ``lease``, which holds ``stream``; see ``StreamLease.release``."""
        self.lock.acquire()
        try:
            if lease._stream is not stream:  # another thread's release won
                raise LeaseError("this lease was already released")
            if self.closed_reason is None:
                # Under the lock: close() cannot destroy the stream during the query.
                probe = stream._capture_probe
                if probe is not None and probe():
                    raise LeaseError(
                        f"{stream!r} is still capturing a CUDA graph; end the capture, then release"
                    )
                self._end_lease_locked(stream, lease._key_state)
            lease._stream = None
        finally:
            self.unlock()

    def _end_lease_locked(self, stream: PooledStream, state: KeyState | None) -> None:
        stream._active_ns += perf_counter_ns() - stream._lease_start
        if state is not None:
            self.keys.finish_locked(state, stream)
        self._give_back_locked(stream)

    def _give_back_locked(self, stream: PooledStream) -> None:
        """Hand ``stream`` to the oldest waiter of its kind, or make it idle."""
        lane = stream._lane
        if lane.waiters:
            waiter = lane.waiters.popleft()
            stream.state = _LEASED  # in transit: neither idle nor anyone else's
            waiter.stream = stream
            waiter.ready.release()
        else:
            stream.state = _IDLE
            if stream._unrecorded_key is None:
                lane.idle.append(stream)
            else:
                lane.idle.insert(0, stream)  # kept for its key as long as others are idle

    def return_dropped(self, stream: PooledStream, state: KeyState | None) -> None:
        """Return the stream of a lease collected unreleased (its finalizer calls this)."""
        self.dropped.put((stream, state))
        # A finalizer may run on a thread that holds the lock already (a
        # collection inside one of our critical sections): it must not wait
        # for ever, and that thread returns the stream as it lets go (unlock).
        if self.lock.acquire(timeout=FINALIZER_LOCK_WAIT_S):
            self.unlock()  # which returns the stream

    def _drain_dropped_locked(self) -> int:
        """Return the streams of leases dropped unreleased; how many went back."""
        capturing = []
        returned = 0
        while True:
            try:
                stream, state = self.dropped.get_nowait()
            except queue.Empty:
                break
            if self.closed_reason is None and stream.state is _LEASED:
                probe = stream._capture_probe
                if probe is not None and probe():
                    # Pulled into a capture (as release() refuses to, this must
                    # not make it idle): back once the capture has ended.
                    capturing.append((stream, state))
                else:
                    self._end_lease_locked(stream, state)
                    returned += 1
        for item in capturing:
            self.dropped.put(item)
        return returned

    # -- the lock ----------------------------------------------------------------

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    def unlock(self) -> None:
        """Let go of the lock, first returning the streams of leases dropped meanwhile.

        Their finalizers ran on this very thread (a collection inside the
        critical section) and could not take the lock; nobody else may come
        to return them, while threads wait for those streams. The keys the
        table forgot meanwhile are let go of after the lock (see ``AffinityTable``).
        """
        keys = self.keys
        try:
            if not self.dropped.empty():
                self._drain_dropped_locked()
            forgotten = keys.forgotten
            if forgotten:
                keys.forgotten = []
        finally:
            self.lock.release()
        del forgotten  # here, if it was the last reference to a key

    def _sleep_for_key_locked(self, remaining: float | None) -> None:
        """Wait for a key to change hands (``AffinityTable``); raise if the pool closed.

        Dropped leases are returned first; when one did go back, the caller
        looks at the key again instead of sleeping (that lease may have held
        it, and its notification came before this wait). Streams kept queued
        by a capture do not count, so a waiter never spins on them.
        """
        if self.dropped.empty() or not self._drain_dropped_locked():
            self.keys.changed.wait(remaining)
        if (error := self.closed_error()) is not None:
            raise error

    # -- whole-pool operations -----------------------------------------------

    def close(self, reason: str, lock_wait: float = -1) -> list[PooledStream]:
        """Mark the pool closed and wake every waiter; return the streams to destroy.

        Idempotent: a second call returns nothing. ``lock_wait`` bounds the
        wait for the lock (a finalizer's call, see ``return_dropped``); when
        it runs out nothing is closed and nothing returned.
        """
        if not self.lock.acquire(timeout=lock_wait):
            return []
        try:
            if self.closed_reason is not None:
                return []
            self.closed_reason = reason
            streams = [stream for lane in self.lanes.values() for stream in lane.streams]
            for lane in self.lanes.values():
                lane.close_locked()
            self.keys.clear_locked()
            while not self.dropped.empty():
                self.dropped.get_nowait()
            for stream in streams:
                stream.state = StreamState.CLOSED
        finally:
            self.unlock()
        return streams


def _deadline(timeout: float) -> float | None:
    seconds = check_timeout_s(timeout)
    return None if seconds is None else time.monotonic() + seconds
