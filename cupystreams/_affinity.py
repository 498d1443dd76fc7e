"""The affinity-key table: which stream served a key last, and where its work ends."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError

if TYPE_CHECKING:
    from ._events import PooledEvent
    from ._stream import PooledStream

__all__ = ["AffinityTable", "KeyState"]


class KeyState:
    """What the pool remembers about one affinity key."""

    __slots__ = ("holder", "last_event", "last_stream")

    def __init__(self) -> None:
        self.holder: int | None = None  # thread ident of the live lease's acquirer
        self.last_stream: PooledStream | None = None
        self.last_event: PooledEvent | None = None  # recorded when the last lease ended


class AffinityTable:
    """Bounded LRU table of affinity keys; every method needs ``lock`` held.

    At most one live lease per key: ``reserve`` waits on the pool's condition
    until the key is free. Forgetting a key (LRU eviction) is safe because its
    last event is released only after the pool made any new stream wait on it
    — a forgotten key simply starts afresh.
    """

    def __init__(self, max_keys: int, lock: threading.RLock) -> None:
        self.max_keys = max_keys
        self.changed = threading.Condition(lock)
        self._keys: OrderedDict[Hashable, KeyState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def held(self) -> int:
        return sum(1 for state in self._keys.values() if state.holder is not None)

    def reserve(
        self,
        key: Hashable,
        thread: int,
        blocking: bool,
        deadline: float | None,
        is_closed: Callable[[], bool],
    ) -> KeyState:
        """Mark ``key`` held by ``thread``, waiting while another lease holds it."""
        state = self._keys.get(key)
        if state is not None and state.holder == thread:
            raise LeaseError(
                f"this thread already holds a lease with affinity_key={key!r}; "
                "release it first (waiting here would deadlock)"
            )
        while state is not None and state.holder is not None:
            if not blocking:
                raise PoolExhaustedError(f"affinity_key={key!r} is held by a live lease")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise PoolTimeoutError(
                    f"affinity_key={key!r} stayed held by another lease past the timeout"
                )
            self.changed.wait(remaining)
            if is_closed():
                raise PoolClosedError("the pool was closed while waiting for an affinity key")
            state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = KeyState()
        self._keys.move_to_end(key)
        state.holder = thread
        return state

    def unreserve(self, key: Hashable, state: KeyState) -> None:
        """Undo ``reserve`` after a failed acquire."""
        state.holder = None
        if state.last_stream is None:
            self._keys.pop(key, None)
        self.changed.notify_all()

    def finish(self, key: Hashable, stream: PooledStream, event: PooledEvent) -> list[PooledEvent]:
        """Record the end of the key's live lease; return events no longer needed."""
        state = self._keys[key]  # held keys are never evicted
        stale = [] if state.last_event is None else [state.last_event]
        state.last_stream, state.last_event, state.holder = stream, event, None
        while len(self._keys) > self.max_keys:
            oldest_key, oldest = next(iter(self._keys.items()))
            if oldest.holder is not None:
                break  # the oldest key is in use; the bound is re-checked later
            del self._keys[oldest_key]
            if oldest.last_event is not None:
                stale.append(oldest.last_event)
        self.changed.notify_all()
        return stale

    def clear(self) -> list[PooledEvent]:
        events = [s.last_event for s in self._keys.values() if s.last_event is not None]
        self._keys.clear()
        self.changed.notify_all()
        return events
