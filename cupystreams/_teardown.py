"""Giving back what is dropped: here, or on a thread of ours when this one is CUDA's.

A pool dropped without ``close()``, or a lease dropped unreleased inside a
reference cycle, is freed by the cycle collector, and a collection runs on
whichever thread happens to allocate: possibly the thread on which CUDA runs
host functions, a thread that Python did not start. CUDA calls are refused
there (or may deadlock), and both a pool's teardown and a release make some
(a synchronize, a capture query, an event record).

So a finalizer on such a thread only hands what it holds to the teardown
thread, a daemon thread of this module, through a ``queue.SimpleQueue``:
its ``put`` is reentrant, safe inside a finalizer that interrupted another
``put`` on the same thread, and takes no lock a finalizer could deadlock on.
The teardown thread releases the leases (waiters get their streams as from any
release), then destroys the pools' streams; a pool that one of those leases
brought back to life is closed there too.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = [
    "destroy_streams",
    "forget_parked",
    "on_a_thread_python_did_not_start",
    "park_lease",
    "start_teardown_thread",
    "wait_settled",
]

THREAD_NAME = "cupystreams-teardown"


class _ParkedLease(Protocol):
    def _release_parked(self) -> None: ...


# ("lease", lease), ("pool", backend, stream handles, objects holding CUDA
# events), or ("flush", threading.Event) from wait_settled.
_Parked = tuple[Any, ...]

_parked: queue.SimpleQueue[_Parked] = queue.SimpleQueue()
_started_in: int | None = None  # the pid whose teardown thread is running
_start_lock = threading.Lock()
_orphans: list[object] = []  # a forked child's share of the parent's parked objects


def on_a_thread_python_did_not_start() -> bool:
    """True on CUDA's host-function thread (and any thread Python did not start)."""
    # threading answers such a thread with a stand-in _DummyThread.
    return isinstance(threading.current_thread(), threading._DummyThread)


def start_teardown_thread() -> None:
    """Start this process's teardown thread, once (every pool calls this)."""
    global _started_in
    if _started_in == os.getpid():
        return
    with _start_lock:
        if _started_in != os.getpid():
            threading.Thread(target=_serve, name=THREAD_NAME, daemon=True).start()
            _started_in = os.getpid()


def destroy_streams(backend: Backend, handles: list[Any], keep_alive: object) -> None:
    """Destroy every stream in ``handles``; ``keep_alive`` is dropped with them.

    The target of a pool's finalizer. On a thread Python did not start, hands
    everything to the teardown thread. Otherwise destroys every stream even
    if one fails (after a faulting kernel every CUDA call reports the error)
    and raises the first failure last.
    """
    if on_a_thread_python_did_not_start():
        _parked.put(("pool", backend, handles, keep_alive))
        return
    first_error: BaseException | None = None
    while handles:
        try:
            backend.destroy_stream(handles.pop())
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def park_lease(lease: _ParkedLease) -> None:
    """Hand a dropped lease to the teardown thread, which releases it."""
    _parked.put(("lease", lease))


def wait_settled(timeout: float = 10.0) -> bool:
    """Wait until everything parked before this call has been dealt with.

    For tests; call from a Python thread of a process that has made a pool.
    Returns False on timeout.
    """
    done = threading.Event()
    _parked.put(("flush", done))
    return done.wait(timeout)


def _serve() -> None:
    while True:
        batch = [_parked.get()]
        while True:
            try:
                batch.append(_parked.get_nowait())
            except queue.Empty:
                break
        # Leases first, so that one of a parked pool is released while its
        # stream is alive; the sort is stable, so a flush stays behind what
        # was parked before it.
        batch.sort(key=lambda item: item[0] != "lease")
        for item in batch:
            try:
                _deal_with(item)
            except Exception:
                _report()
        del batch, item  # nothing parked stays alive in this thread's frame


def _deal_with(item: _Parked) -> None:
    kind = item[0]
    if kind == "lease":
        item[1]._release_parked()
    elif kind == "pool":
        _, backend, handles, _keep_alive = item
        destroy_streams(backend, handles, None)
    else:
        item[1].set()


def _report() -> None:
    # As an exception in a finalizer is reported: printed, and the thread goes on.
    exc_type, exc, tb = sys.exc_info()
    assert exc_type is not None
    threading.excepthook(threading.ExceptHookArgs((exc_type, exc, tb, threading.current_thread())))


def forget_parked() -> None:
    """After fork, in the child: the parent's CUDA objects are not ours to destroy.

    They are kept, never freed (freeing a CuPy stream or event calls CUDA),
    and the child starts its own teardown thread with its first pool.
    """
    global _parked, _started_in, _start_lock
    _orphans.append(_parked)
    _parked = queue.SimpleQueue()
    _started_in = None
    _start_lock = threading.Lock()  # a parent thread may have held it at fork
