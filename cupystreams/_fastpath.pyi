"""Types of the C hot path (``_fastpath.c``); its Python subclasses add the rest."""

from collections import deque
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import Any

from typing_extensions import Self

from ._backends import Backend
from ._events import EventPool, PooledEvent
from ._lanes import Lane, _Waiter
from ._lease import StreamLease
from ._stream import PooledStream
from ._types import StreamState

class LaneCore:
    idle: list[PooledStream]
    waiters: deque[_Waiter]

class StreamCore:
    state: StreamState
    _lane: Lane
    _acquisitions: int
    _lease_start: int
    _active_ns: int
    _capture_handle: int
    _handle: Any
    _backend: Backend
    _device: int
    _cupy_current: bool

class LeaseCore:
    @property
    def _stream(self) -> PooledStream | None: ...
    @property
    def _key(self) -> Hashable | None: ...
    @property
    def _serial(self) -> int: ...
    def release(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> None: ...
    def _take_stream(self) -> PooledStream | None: ...

class PoolCore:
    _closed: bool
    _compute: Lane
    _comm: Lane
    _high: Lane
    def acquire_compute(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease: ...
    def acquire_comm(
        self,
        affinity_key: Hashable | None = None,
        blocking: bool = True,
        timeout: float | None = None,
    ) -> StreamLease: ...
    def acquire_high_priority(
        self, blocking: bool = True, timeout: float | None = None
    ) -> StreamLease: ...

class EventCore:
    @property
    def _handle(self) -> Any: ...
    @property
    def _pool(self) -> EventPool: ...
    @property
    def event_id(self) -> int: ...
    @property
    def _held(self) -> bool: ...
    def _take_hold(self) -> Any: ...

class EventPoolCore:
    _idle: list[tuple[Any, int]]
    _closed_reason: str | None
    max_size: int
    def acquire(self) -> PooledEvent: ...
    def release(self, event: PooledEvent, /) -> None: ...

def new_event(pool: EventPool, handle: Any, event_id: int, /) -> PooledEvent: ...
def new_lease(stream: PooledStream, key: Hashable | None, /) -> StreamLease: ...
def now_ns() -> int: ...
def configure(
    *, lease_class: type[LeaseCore], event_class: type[EventCore], lease_error: type[Exception],
    leased: StreamState,
    idle: StreamState,
) -> None: ...
def set_capture_query(address: int, /) -> None: ...
def make_current(device: int, stream: Any, /) -> tuple[int, Any]: ...
def restore_current(device: int, saved: tuple[int, Any], /) -> None: ...
def configure_cupy(
    *, get_device: Callable[[], int], set_device: Callable[[int], None],
    get_current_stream: Callable[[int], Any],
) -> None: ...
