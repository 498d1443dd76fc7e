"""Lane: the streams of one kind, their idle list and their FIFO of waiters.

Every method needs the pool's lock held (the ``_locked`` suffix says so); the
lock and the rules that use these methods are in ``_core``.

The idle list is ordered so that a plain ``pop()`` takes the stream an
affinity key is least likely to want back: streams that no key used last
are appended at the end, and a stream whose last lease had a key goes to
the front. A key asks for its own stream by name (``PoolCore._take_locked``).
"""

from __future__ import annotations

import threading
from collections import deque

from ._stream import PooledStream
from ._types import StreamKind

__all__ = ["Lane", "Waiter"]


class Waiter:
    """A thread blocked in acquire; a releaser hands it a stream directly.

    ``ready`` is a lock taken at creation: the waiting thread blocks taking it
    again, and whoever hands over a stream (or closes the pool) releases it,
    once.
    """

    __slots__ = ("closed", "ready", "stream")

    def __init__(self) -> None:
        self.stream: PooledStream | None = None
        self.closed = False
        self.ready = threading.Lock()
        self.ready.acquire()


class Lane:
    """One kind's streams: ``idle``, ``waiters`` (oldest first) and counters."""

    __slots__ = ("capacity", "idle", "key_waiting", "kind", "streams", "waiters")

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        self.streams: list[PooledStream] = []
        self.capacity = 0
        self.idle: list[PooledStream] = []
        self.waiters: deque[Waiter] = deque()
        self.key_waiting = 0  # threads queued for an affinity key of this kind

    def add_locked(self, stream: PooledStream) -> None:
        self.streams.append(stream)
        self.capacity = len(self.streams)
        self.idle.insert(0, stream)  # the first stream made is popped first

    @property
    def waiting(self) -> int:
        """Threads blocked in an acquire of this kind, for a stream or a key."""
        return len(self.waiters) + self.key_waiting

    def close_locked(self) -> None:
        """Wake every waiter with "closed"; forget the streams (no cycle outlives the pool)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            waiter.closed = True
            waiter.ready.release()
        self.idle.clear()
        self.streams = []
