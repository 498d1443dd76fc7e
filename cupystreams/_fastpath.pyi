"""Types of the C hot path (``_fastpath.c``); its Python subclasses add the rest."""

from collections import deque
from collections.abc import Hashable
from typing import Any

from ._backends import Backend
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

class LeaseCore:
    @property
    def _stream(self) -> PooledStream | None: ...
    @property
    def _key(self) -> Hashable | None: ...
    @property
    def _serial(self) -> int: ...
    _token: tuple[Backend, Any] | None
    def release(self) -> None: ...
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

def new_lease(stream: PooledStream, key: Hashable | None, /) -> StreamLease: ...
def now_ns() -> int: ...
def configure(
    *, lease_class: type[LeaseCore], lease_error: type[Exception], leased: StreamState,
    idle: StreamState,
) -> None: ...
def set_capture_query(address: int, /) -> None: ...
