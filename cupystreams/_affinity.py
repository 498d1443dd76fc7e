"""The affinity-key table: which stream served a key last, and where its work ends."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError

if TYPE_CHECKING:
    from ._events import PooledEvent
    from ._lanes import Lane
    from ._stream import PooledStream

__all__ = ["AffinityTable", "KeyState"]


class KeyState:
    """What the pool remembers about one affinity key."""

    __slots__ = ("holder", "last_event", "last_stream_id", "queue")

    def __init__(self) -> None:
        self.holder: int | None = None  # thread ident of the live lease's acquirer
        # The stream's id, not the stream: the table holds no path back to
        # the pool, so the pool's finalizer can keep the table's events alive.
        self.last_stream_id: int | None = None
        self.last_event: PooledEvent | None = None  # recorded when the last lease ended
        self.queue: deque[object] = deque()  # tickets of threads waiting, oldest first

    def idle(self) -> bool:
        return self.holder is None and not self.queue


class AffinityTable:
    """Bounded LRU table of affinity keys; every method needs ``lock`` held.

    At most one live lease per key: ``reserve`` queues the caller and waits on
    the pool's condition until the key is free and the caller is first in
    line. Only idle keys are forgotten (least recently used first); a
    forgotten key starts afresh, without ordering against its old leases.
    """

    def __init__(self, max_keys: int, lock: threading.RLock) -> None:
        self.max_keys = max_keys
        self.changed = threading.Condition(lock)
        self._keys: OrderedDict[Hashable, KeyState] = OrderedDict()
        # The keys' last events, apart from the keys: the pool's finalizer
        # keeps these (their CUDA events must not die on CUDA's thread), never
        # the keys, which are the user's objects and may lead back to the pool.
        self.events: set[PooledEvent] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def reserve(
        self,
        key: Hashable,
        thread: int,
        blocking: bool,
        deadline: float | None,
        closed_error: Callable[[], PoolClosedError | None],
        lane: Lane,
    ) -> KeyState:
        """Mark ``key`` held by ``thread``; wait first come, first served while it is held.

        ``lane.key_waiting`` counts this thread while it waits, so the pool's
        statistics show threads blocked on a key as waiting.
        """
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = KeyState()
        elif state.holder == thread:
            raise LeaseError(
                f"this thread already holds a lease with affinity_key={key!r}; "
                "release it first (waiting here would deadlock)"
            )
        if not state.idle():
            if not blocking:
                raise PoolExhaustedError(
                    f"affinity_key={key!r} is held by a live lease; wait with blocking=True"
                )
            self._wait_turn(key, state, deadline, closed_error, lane)
        self._keys.move_to_end(key)
        state.holder = thread
        return state

    def _wait_turn(
        self,
        key: Hashable,
        state: KeyState,
        deadline: float | None,
        closed_error: Callable[[], PoolClosedError | None],
        lane: Lane,
    ) -> None:
        ticket = object()
        state.queue.append(ticket)
        lane.key_waiting += 1
        try:
            while state.holder is not None or state.queue[0] is not ticket:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeoutError(
                        f"affinity_key={key!r} stayed held by another lease past the timeout"
                    )
                self.changed.wait(remaining)
                if (error := closed_error()) is not None:
                    raise error
        finally:
            state.queue.remove(ticket)
            lane.key_waiting -= 1
            self.changed.notify_all()  # the next ticket may be first now

    def unreserve(self, key: Hashable, state: KeyState) -> None:
        """Undo ``reserve`` after a failed acquire."""
        state.holder = None
        if state.last_stream_id is None and state.idle() and self._keys.get(key) is state:
            del self._keys[key]
        self.changed.notify_all()

    def finish(self, key: Hashable, stream: PooledStream, event: PooledEvent) -> list[PooledEvent]:
        """Record the end of the key's live lease; return events no longer needed."""
        state = self._keys.get(key)  # held keys are never evicted, only cleared by close()
        if state is None:
            return [event]
        stale = [] if state.last_event is None else [state.last_event]
        state.last_stream_id, state.last_event, state.holder = stream.stream_id, event, None
        self.events.add(event)
        excess = len(self._keys) - self.max_keys
        if excess > 0:
            # Oldest first, skipping keys in use (held, or with threads queued);
            # usually the very oldest is idle and the scan stops there.
            victims: list[Hashable] = []
            for old_key, old in self._keys.items():
                if old.idle():
                    victims.append(old_key)
                    if len(victims) == excess:
                        break
            for old_key in victims:
                old = self._keys.pop(old_key)
                if old.last_event is not None:
                    stale.append(old.last_event)
        self.events.difference_update(stale)
        self.changed.notify_all()
        return stale

    def clear(self) -> list[PooledEvent]:
        events = [s.last_event for s in self._keys.values() if s.last_event is not None]
        self._keys.clear()
        self.events.clear()
        self.changed.notify_all()
        return events
