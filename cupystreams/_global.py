"""One pool per device for code that wants a shared default.

The global pools take no ``backend`` argument: they use the GPU, or the host
backend when ``CUPYSTREAMS_BACKEND=host`` is set.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Iterator

from ._backends import GLOBAL_OPT_IN, current_device
from ._lease import StreamLease
from ._pool import CudaStreamPool

__all__ = [
    "comm_stream",
    "compute_stream",
    "get_global_stream_pool",
    "high_priority_stream",
    "reset_global_pool",
]

_pools: dict[int, CudaStreamPool] = {}
_lock = threading.Lock()


def get_global_stream_pool(compute_streams: int = 4, comm_streams: int = 2) -> CudaStreamPool:
    """The shared pool of the current device, created on first use.

    Thread-safe: concurrent first calls create one pool. A later call that
    asks for other sizes raises ``ValueError`` instead of silently returning a
    pool shaped differently from what it asked for. The pool follows
    ``CUPYSTREAMS_BACKEND`` (``host`` for the host backend).

    Raises:
        BackendUnavailableError: No usable GPU and ``CUPYSTREAMS_BACKEND`` is
            not ``host``.
        ValueError: The pool exists with other sizes.
    """
    pool, created = _device_pool(compute_streams, comm_streams)
    if created:
        return pool
    stats = pool.stats()
    if (stats.compute.capacity, stats.comm.capacity) != (compute_streams, comm_streams):
        raise ValueError(
            f"the global pool of device {pool.device} exists with compute_streams="
            f"{stats.compute.capacity}, comm_streams={stats.comm.capacity}; call "
            "reset_global_pool() before asking for other sizes"
        )
    return pool


def _device_pool(compute_streams: int = 4, comm_streams: int = 2) -> tuple[CudaStreamPool, bool]:
    """The current device's open global pool, created with these sizes if needed."""
    # These functions take no backend: without a GPU, the fix is the variable.
    device = current_device(opt_in=GLOBAL_OPT_IN)
    with _lock:
        pool = _pools.get(device)
        if pool is not None and not pool.closed:
            return pool, False
        pool = _pools[device] = CudaStreamPool(compute_streams, comm_streams, device=device)
        return pool, True


def reset_global_pool() -> None:
    """Close every global pool and forget it; the next call creates fresh ones."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


@contextlib.contextmanager
def compute_stream(affinity_key: Hashable | None = None) -> Iterator[StreamLease]:
    """A compute lease of the global pool (whatever its sizes), current for the block."""
    with _device_pool()[0].compute_context(affinity_key) as lease:
        yield lease


@contextlib.contextmanager
def comm_stream(affinity_key: Hashable | None = None) -> Iterator[StreamLease]:
    """A comm lease of the global pool (whatever its sizes), current for the block."""
    with _device_pool()[0].comm_context(affinity_key) as lease:
        yield lease


@contextlib.contextmanager
def high_priority_stream() -> Iterator[StreamLease]:
    """A high-priority lease of the global pool (whatever its sizes), current for the block."""
    with _device_pool()[0].high_priority_context() as lease:
        yield lease


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    _pools.clear()  # the parent's pools are unusable here; start afresh


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
