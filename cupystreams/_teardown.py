"""Destroying a pool's streams: now, or later when the thread is CUDA's own.

A pool dropped without ``close()`` is freed by the cycle collector (its
streams point back at it), and a collection runs on whichever thread happens
to allocate: possibly the thread on which CUDA runs host functions, a thread
that Python did not start. CUDA calls are refused there (or may deadlock), so
a finalizer on such a thread only parks the pool's CUDA objects; the next pool
created or closed on a Python thread destroys them.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["destroy_parked", "destroy_streams", "forget_parked", "parked_count"]

# (backend, stream handles, objects whose CUDA events go with them), per pool.
_parked: list[tuple[Backend, list[Any], object]] = []
_parked_lock = threading.Lock()
_orphans: list[object] = []  # a forked child's share of the parent's parked objects


def _on_a_thread_python_did_not_start() -> bool:
    # threading answers a thread it did not start (CUDA's host-function
    # thread, a C++ library's worker) with a stand-in _DummyThread.
    return isinstance(threading.current_thread(), threading._DummyThread)


def destroy_streams(backend: Backend, handles: list[Any], keep_alive: object) -> None:
    """Destroy every stream in ``handles``; ``keep_alive`` is dropped with them.

    The target of a pool's finalizer. On a thread Python did not start, parks
    everything for ``destroy_parked``. Otherwise destroys every stream even if
    one fails (after a faulting kernel every CUDA call reports the error) and
    raises the first failure last.
    """
    if _on_a_thread_python_did_not_start():
        with _parked_lock:
            _parked.append((backend, handles, keep_alive))
        return
    first_error: BaseException | None = None
    while handles:
        try:
            backend.destroy_stream(handles.pop())
        except Exception as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def destroy_parked() -> None:
    """Destroy what finalizers parked on threads Python did not start.

    A failure is a warning, not an exception: it belongs to a pool nobody
    holds any more, not to the caller.
    """
    if not _parked or _on_a_thread_python_did_not_start():
        return
    with _parked_lock:
        parked = _parked[:]
        _parked.clear()
    for backend, handles, _keep_alive in parked:
        try:
            destroy_streams(backend, handles, None)
        except Exception as exc:
            warnings.warn(
                f"a pool dropped without close() left streams that could not be destroyed: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )


def forget_parked() -> None:
    """After fork, in the child: the parent's CUDA objects are not ours to destroy.

    They are kept, never freed: freeing a CuPy stream or event calls CUDA.
    """
    global _parked_lock
    _parked_lock = threading.Lock()  # a parent thread may have held it at fork
    _orphans.extend(_parked)
    _parked.clear()


def parked_count() -> int:
    """Pools whose streams wait for ``destroy_parked`` (for tests and stats)."""
    return len(_parked)
