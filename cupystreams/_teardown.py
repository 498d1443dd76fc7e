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
``put`` on the same thread. The teardown thread releases the leases (waiters
get their streams as from any release) and destroys the pools' streams; a pool
that one of those leases brought back to life is closed there too. An error
there is printed, and the thread goes on.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import traceback
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
_thread: threading.Thread | None = None  # this process's teardown thread (a fork's child: none)
_start_lock = threading.Lock()
_orphans: list[object] = []  # a forked child's share of the parent's parked objects


def on_a_thread_python_did_not_start() -> bool:
    """True on CUDA's host-function thread (and any thread Python did not start)."""
    # threading answers such a thread with a stand-in _DummyThread.
    return isinstance(threading.current_thread(), threading._DummyThread)


def start_teardown_thread() -> None:
    """Start this process's teardown thread unless it runs (every pool calls this)."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    with _start_lock:
        if _thread is not None and _thread.is_alive():
            return
        thread = threading.Thread(target=_serve, name=THREAD_NAME, daemon=True)
        try:
            thread.start()
        except RuntimeError:
            return  # at interpreter shutdown (3.12+): nothing will be parked any more
        _thread = thread


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
        # What was parked lives only in _serve_batch's frame: gone when the
        # flushes are set, so a waiter of wait_settled finds it all freed.
        for done in _serve_batch(_take_batch()):
            done.set()


def _take_batch() -> list[_Parked]:
    batch = [_parked.get()]
    while True:
        try:
            batch.append(_parked.get_nowait())
        except queue.Empty:
            return batch


def _serve_batch(batch: list[_Parked]) -> list[threading.Event]:
    """Deal with ``batch``; return the events of the flushes in it."""
    # Leases first within a batch: one collected with its pool is usually
    # released before the pool's streams are destroyed (a pool served in an
    # earlier batch is closed by the lease's release anyway).
    work = sorted((item for item in batch if item[0] != "flush"), key=lambda i: i[0] != "lease")
    flushes = [item[1] for item in batch if item[0] == "flush"]
    batch.clear()
    while work:
        try:
            _deal_with(work.pop(0))
        except BaseException:
            _report()
    return flushes


def _deal_with(item: _Parked) -> None:
    if item[0] == "lease":
        item[1]._release_parked()
    else:
        _, backend, handles, _keep_alive = item
        destroy_streams(backend, handles, None)


def _report() -> None:
    # As an exception in a finalizer is reported: printed, and the thread goes
    # on, whatever printing does (a closed stderr must not stop the teardown).
    with contextlib.suppress(BaseException):
        traceback.print_exc(file=sys.stderr)


def forget_parked() -> None:
    """After fork, in the child: the parent's CUDA objects are not ours to destroy.

    They are kept, never freed (freeing a CuPy stream or event calls CUDA),
    and the child starts its own teardown thread with its first pool.
    """
    global _parked, _thread, _start_lock
    _orphans.append(_parked)
    _parked = queue.SimpleQueue()
    _thread = None
    _start_lock = threading.Lock()  # a parent thread may have held it at fork
