"""cupystreams: a CUDA stream and event pool for Python, built on CuPy.

Leases on long-lived pooled streams replace creating a stream per task:
``with pool.acquire_compute() as s:`` makes a pooled stream current for CuPy
and returns it when the block ends. The manual (``docs/``) states the rules.
"""

from __future__ import annotations

from ._errors import (
    BackendUnavailableError,
    LeaseError,
    PoolClosedError,
    PoolError,
    PoolExhaustedError,
    PoolTimeoutError,
)
from ._events import EventPool, PooledEvent
from ._global import (
    comm_stream,
    compute_stream,
    get_global_stream_pool,
    high_priority_stream,
    reset_global_pool,
)
from ._graph import CapturedGraph
from ._lease import StreamLease
from ._pool import CudaStreamPool
from ._stats import EventPoolStats, KindStats, PoolStats, StreamStats
from ._stream import PooledStream
from ._types import CudaStreamLike, StreamKind, StreamPriority, StreamState

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CapturedGraph",
    "CudaStreamLike",
    "CudaStreamPool",
    "EventPool",
    "EventPoolStats",
    "KindStats",
    "LeaseError",
    "PoolClosedError",
    "PoolError",
    "PoolExhaustedError",
    "PoolStats",
    "PoolTimeoutError",
    "PooledEvent",
    "PooledStream",
    "StreamKind",
    "StreamLease",
    "StreamPriority",
    "StreamState",
    "StreamStats",
    "comm_stream",
    "compute_stream",
    "get_global_stream_pool",
    "high_priority_stream",
    "reset_global_pool",
]
