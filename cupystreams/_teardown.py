"""Giving back what is dropped: now, or later when the thread is CUDA's own.

A pool dropped without ``close()``, or a lease dropped unreleased inside a
reference cycle, is freed by the cycle collector, and a collection runs on
whichever thread happens to allocate: possibly the thread on which CUDA runs
host functions, a thread that Python did not start. CUDA calls are refused
there (or may deadlock), and a release makes some (a capture query, an event
record). So a finalizer on such a thread only parks what it holds; a Python
thread finishes the job:

- a parked lease is released by the next acquire that leaves the fast path
  (one that would wait, a keyed one), by ``close()``, or by a new pool;
- a parked pool's streams and events are destroyed by a new pool or ``close()``.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = [
    "destroy_parked",
    "destroy_streams",
    "forget_parked",
    "on_a_thread_python_did_not_start",
    "park_lease",
    "parked_count",
    "release_parked_leases",
]


class _DroppedLease(Protocol):
    def _release_dropped(self) -> None: ...


# (backend, stream handles, objects whose CUDA events go with them), per pool.
_parked_pools: list[tuple[Backend, list[Any], object]] = []
_parked_leases: list[_DroppedLease] = []
# Re-entrant: a collection may start inside a locked block (any allocation)
# and run a finalizer that parks on the same thread.
_parked_lock = threading.RLock()
_orphans: list[object] = []  # a forked child's share of the parent's parked objects


def on_a_thread_python_did_not_start() -> bool:
    """True on CUDA's host-function thread (and any thread Python did not start)."""
    # threading answers such a thread with a stand-in _DummyThread.
    return isinstance(threading.current_thread(), threading._DummyThread)


def destroy_streams(backend: Backend, handles: list[Any], keep_alive: object) -> None:
    """Destroy every stream in ``handles``; ``keep_alive`` is dropped with them.

    The target of a pool's finalizer. On a thread Python did not start, parks
    everything for ``destroy_parked``. Otherwise destroys every stream even if
    one fails (after a faulting kernel every CUDA call reports the error) and
    raises the first failure last.
    """
    if on_a_thread_python_did_not_start():
        parked = (backend, handles, keep_alive)
        with _parked_lock:
            _parked_pools.append(parked)
        return
    first_error: BaseException | None = None
    while handles:
        try:
            backend.destroy_stream(handles.pop())
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def park_lease(lease: _DroppedLease) -> None:
    """Keep a dropped lease (its finalizer runs on a thread Python did not start)."""
    with _parked_lock:
        _parked_leases.append(lease)


def release_parked_leases() -> None:
    """Release the leases parked by ``park_lease``, if this is a Python thread.

    Each is released and warned about (``ResourceWarning``). Under
    ``-W error`` a warning raises: every lease is released first, then the
    first such error is raised.
    """
    if not _parked_leases or on_a_thread_python_did_not_start():
        return
    with _parked_lock:
        leases = _parked_leases[:]
        _parked_leases.clear()
    first_error: Exception | None = None
    for lease in leases:
        try:
            lease._release_dropped()  # here it releases, then warns
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def destroy_parked() -> None:
    """Release parked leases, then destroy parked pools' streams and events.

    Leases first: a lease of a parked pool is released while its stream
    still exists. Everything parked is dealt with before anything is raised.
    A failure to destroy is a warning, not an exception: it belongs to a pool
    nobody holds any more, not to the caller.
    """
    if on_a_thread_python_did_not_start():
        return
    lease_error: Exception | None = None
    try:
        release_parked_leases()
    except Exception as exc:
        lease_error = exc
    with _parked_lock:
        pools = _parked_pools[:]
        _parked_pools.clear()
    failures: list[Exception] = []
    for backend, handles, _keep_alive in pools:
        try:
            destroy_streams(backend, handles, None)
        except Exception as exc:
            failures.append(exc)
    if failures:
        warnings.warn(
            f"{len(failures)} pool(s) dropped without close() left streams that could "
            f"not be destroyed; the first error: {failures[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
    if lease_error is not None:
        raise lease_error


def forget_parked() -> None:
    """After fork, in the child: the parent's CUDA objects are not ours to destroy.

    They are kept, never freed: freeing a CuPy stream or event calls CUDA.
    """
    global _parked_lock
    _parked_lock = threading.RLock()  # a parent thread may have held it at fork
    _orphans.extend(_parked_pools)
    _orphans.extend(_parked_leases)
    _parked_pools.clear()
    _parked_leases.clear()


def parked_count() -> tuple[int, int]:
    """(pools, leases) waiting for a Python thread, for tests."""
    return len(_parked_pools), len(_parked_leases)
