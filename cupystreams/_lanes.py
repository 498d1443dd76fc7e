"""Lane: the streams of one kind, their idle list and their FIFO of waiters.

The uncontended path never locks: an acquire pops the idle list and a
release appends to it (both atomic; in C, see ``_fastpath.c``). Waiting goes
through the pool's lock: a waiter queues itself, then re-checks the idle
list, and a releaser that finds waiters hands streams over under the lock,
oldest waiter first. Because the releaser appends before it looks for
waiters, and the waiter queues before it looks for idle streams, no stream is
left idle while a waiter sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable

from ._errors import PoolClosedError, PoolExhaustedError, PoolTimeoutError
from ._fastpath import LaneCore
from ._stream import PooledStream
from ._types import StreamKind

__all__ = ["Lane"]


class _Waiter:
    """A thread blocked in acquire; a releaser hands it a stream directly."""

    __slots__ = ("closed", "ready", "stream")

    def __init__(self) -> None:
        self.stream: PooledStream | None = None
        self.closed = False
        self.ready = threading.Event()


class Lane(LaneCore):
    """One kind's streams. ``lock`` is the pool's; counters change under it.

    ``idle`` and ``waiters`` live in the C base ``LaneCore``, where the hot
    path reads them.
    """

    __slots__ = ("capacity", "key_waiting", "kind", "lock", "streams")

    def __init__(self, kind: StreamKind, streams: list[PooledStream], lock: threading.RLock):
        self.kind = kind
        self.streams = streams
        self.capacity = len(streams)
        self.idle = list(streams)
        self.waiters = deque()
        self.key_waiting = 0  # threads queued for an affinity key of this kind
        self.lock = lock

    @property
    def waiting(self) -> int:
        """Threads blocked in an acquire of this kind, for a stream or a key."""
        return len(self.waiters) + self.key_waiting

    def take(
        self,
        blocking: bool,
        deadline: float | None,
        prefer: PooledStream | None,
        closed_error: Callable[[], PoolClosedError | None],
    ) -> PooledStream:
        """An idle stream (``prefer`` if it is idle and nobody waits), waiting FIFO.

        Raises:
            PoolExhaustedError: None idle and ``blocking`` is False.
            PoolTimeoutError: None became idle before ``deadline``.
            PoolClosedError: The pool is or got closed.
        """
        with self.lock:
            if (error := closed_error()) is not None:
                raise error
            if not self.waiters:
                if prefer is not None:
                    with contextlib.suppress(ValueError):
                        self.idle.remove(prefer)
                        return prefer
                with contextlib.suppress(IndexError):
                    return self.idle.pop()
            if not blocking:
                raise PoolExhaustedError(
                    f"no idle {self.kind.value} stream ({self.capacity} all leased); "
                    "wait with blocking=True or create the pool with more streams"
                )
            waiter = _Waiter()
            self.waiters.append(waiter)
            self._hand_off()  # a lock-free release may have raced our check
        finished = False
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waiter.ready.wait(remaining)
            finished = True
        finally:
            with self.lock:
                stream = waiter.stream
                if stream is None:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
            if not finished and stream is not None:
                self.give_back(stream)  # interrupted after the hand-off
        if stream is not None:
            # Handed over just before close(): the stream is dead, so is this acquire.
            if (error := closed_error()) is not None:
                raise error
            return stream
        if waiter.closed:
            raise closed_error() or PoolClosedError("the pool was closed")
        raise PoolTimeoutError(
            f"no {self.kind.value} stream became idle within the timeout "
            f"({self.capacity} streams, all leased); raise timeout= or the pool size"
        )

    def give_back(self, stream: PooledStream) -> None:
        """Return ``stream``: to the oldest waiter if any, else to the idle list."""
        self.idle.append(stream)
        if self.waiters:
            self.hand_off_locked()

    def hand_off_locked(self) -> None:
        with self.lock:
            self._hand_off()

    def _hand_off(self) -> None:
        # The stream is taken first: once the last waiter is off the queue, a
        # lock-free acquire on another thread may take an idle stream, so
        # popping the waiter first could leave it with none. Waiters leave the
        # queue only under the lock, so one is still there after the pop.
        while self.waiters:
            try:
                stream = self.idle.pop()
            except IndexError:
                return
            waiter = self.waiters.popleft()
            waiter.stream = stream
            waiter.ready.set()

    def close(self) -> None:
        """Wake every waiter with "closed" and forget the idle streams (lock held)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.closed = True
            waiter.ready.set()
        self.idle.clear()
