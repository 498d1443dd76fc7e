"""The affinity-key table: which stream served a key last, and where its work ends.

Every method needs the pool's lock held; the rules that call them are in
``_core``. A key's end is recorded lazily: a keyed release records nothing,
and the stream remembers the key (``PooledStream._unrecorded_key``). Only
when that stream goes to another holder, or the key moves to another
stream, is an event recorded on it; until then nothing else has been queued
there, so the event marks exactly the end of the key's work.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from ._errors import LeaseError, PoolExhaustedError, PoolTimeoutError

if TYPE_CHECKING:
    from ._events import EventPool, PooledEvent
    from ._lanes import Lane
    from ._stream import PooledStream

__all__ = ["AffinityTable", "KeyState"]


class KeyState:
    """What the pool remembers about one affinity key."""

    __slots__ = ("holder", "last_event", "last_stream", "queue")

    def __init__(self) -> None:
        self.holder: int | None = None  # thread ident of the live lease's acquirer
        self.last_stream: PooledStream | None = None  # where the key's last lease ran
        # The end of the key's last lease, once recorded (see the module's docstring).
        self.last_event: PooledEvent | None = None
        self.queue: deque[object] = deque()  # tickets of threads waiting, oldest first

    def idle(self) -> bool:
        return self.holder is None and not self.queue


class AffinityTable:
    """Bounded LRU table of affinity keys.

    At most one live lease per key: ``reserve_locked`` queues the caller and
    waits on ``changed`` (a condition over the pool's lock) until the key is
    free and the caller is first in line. Only idle keys are forgotten (least
    recently used first); a forgotten key starts afresh, without ordering
    against its old leases. The keys forgotten wait in ``forgotten`` until the
    pool's lock is let go (``PoolCore.unlock``): a user's key may hold the last
    reference to the pool, whose finalizer takes the lock.
    """

    def __init__(self, max_keys: int, lock: threading.Lock, events: EventPool) -> None:
        self.max_keys = max_keys
        self.changed = threading.Condition(lock)
        self.events = events
        self._keys: OrderedDict[Hashable, KeyState] = OrderedDict()
        self.forgotten: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._keys)

    def held_events(self) -> int:
        """Events the table holds: one per key whose stream went to another holder."""
        return sum(state.last_event is not None for state in self._keys.values())

    def reserve_locked(
        self,
        key: Hashable,
        thread: int,
        blocking: bool,
        deadline: float | None,
        sleep: Callable[[float | None], None],
        lane: Lane,
    ) -> KeyState:
        """Mark ``key`` held by ``thread``; wait first come, first served while it is held.

        ``sleep(timeout)`` waits (on ``changed``, or not at all) and raises when
        the pool closed. ``lane.key_waiting`` counts this thread while it
        waits, so the pool's statistics show threads blocked on a key as waiting.
        """
        keys = self._keys
        try:
            state = keys[key]
        except KeyError:
            state = keys[key] = KeyState()
        except TypeError:
            raise TypeError(f"affinity_key={key!r} must be hashable") from None
        else:
            if state.holder is not None or state.queue:
                if state.holder == thread:
                    raise LeaseError(
                        f"this thread already holds a lease with affinity_key={key!r}; "
                        "release it first (waiting here would deadlock)"
                    )
                if not blocking:
                    raise PoolExhaustedError(
                        f"affinity_key={key!r} is held by a live lease; wait with blocking=True"
                    )
                self._wait_turn_locked(key, state, deadline, sleep, lane)
            keys.move_to_end(key)
        state.holder = thread
        return state

    def _wait_turn_locked(
        self,
        key: Hashable,
        state: KeyState,
        deadline: float | None,
        sleep: Callable[[float | None], None],
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
                sleep(remaining)
        finally:
            state.queue.remove(ticket)
            lane.key_waiting -= 1
            if state.queue:
                self.changed.notify_all()  # the next ticket may be first now

    def unreserve_locked(self, key: Hashable, state: KeyState) -> None:
        """Undo ``reserve_locked`` after a failed acquire."""
        state.holder = None
        if state.queue:
            self.changed.notify_all()
        elif state.last_stream is None and self._keys.get(key) is state:
            del self._keys[key]

    def begin_locked(self, state: KeyState, stream: PooledStream) -> bool:
        """Order the key's new lease on ``stream`` after its earlier work.

        On the key's last stream, stream order already holds. On another one
        (the key moves), ``stream`` waits, on the device, for the key's
        recorded end; returns True when it did.
        """
        last = state.last_stream
        if last is not None and last is not stream and last._unrecorded_key is state:
            self.record_end_locked(state, last)  # the key moves away from an idle stream
        event = state.last_event
        if event is None:
            return False
        moved = last is not stream
        if moved:
            # Should the wait fail, the key keeps its end for its next lease.
            stream._backend.wait_event(stream._handle, event._handle)
        state.last_event = None
        # CUDA takes the event's state at the wait: it can be reused now.
        self.events.release(event)
        return moved

    def record_end_locked(self, state: KeyState, stream: PooledStream) -> None:
        """Record the end of ``state``'s last lease, which ran on the idle ``stream``."""
        event = self.events.acquire()
        try:
            stream._backend.record(event._handle, stream._handle)
        except BaseException:
            self.events.release(event)
            raise
        if state.last_event is not None:
            self.events.release(state.last_event)
        state.last_event = event
        stream._unrecorded_key = None

    def finish_locked(self, state: KeyState, stream: PooledStream) -> None:
        """The key's live lease on ``stream`` ended: remember the stream, free the key.

        Held keys are never forgotten, so ``state`` is still the key's (close()
        clears the table, but then nothing is finished any more).
        """
        state.holder = None
        state.last_stream = stream
        stream._unrecorded_key = state
        if len(self._keys) > self.max_keys:
            self._evict_locked()
        if state.queue:
            self.changed.notify_all()  # a thread waits for this key

    def _evict_locked(self) -> None:
        excess = len(self._keys) - self.max_keys
        if excess <= 0:
            return
        # Oldest first, skipping keys in use (held, or with threads queued);
        # usually the very oldest is idle and the scan stops there.
        victims: list[Hashable] = []
        for old_key, old in self._keys.items():
            if old.idle():
                victims.append(old_key)
                if len(victims) == excess:
                    break
        for old_key in victims:
            self._forget_locked(self._keys.pop(old_key))
        self.forgotten += victims

    def _forget_locked(self, state: KeyState) -> None:
        if state.last_stream is not None and state.last_stream._unrecorded_key is state:
            state.last_stream._unrecorded_key = None
        if state.last_event is not None:
            self.events.release(state.last_event)
            state.last_event = None
        state.last_stream = None

    def clear_locked(self) -> None:
        """Forget every key (``close``): their events go back, no stream is referenced."""
        for state in self._keys.values():
            self._forget_locked(state)
        self._keys.clear()
        self.changed.notify_all()
