"""Host functions run by a thread of the library, never by one that CUDA started.

``cudaLaunchHostFunc`` would run Python on CUDA's own callback thread, where
no CUDA call is allowed and where a garbage collection could free pools and
leases. Instead, launching a host function records an event on the stream,
and this module's thread waits for the event, then calls the function. The
function runs after the work queued before it, as with CUDA; unlike CUDA,
later work on the stream does not wait for the function.

Locking: ``CallbackThread._changed`` (a ``threading.Condition`` over its own
lock) guards every field below (but for one store of ``_closing`` by a
dropped pool's finalizer that cannot take it in time); the waiting for events
and the calls happen outside it.

| field | meaning |
| --- | --- |
| ``_pending`` | (stream key, event, function) not yet run, oldest first |
| ``_launched`` / ``_finished`` | per stream key: functions launched / run so far |
| ``_thread`` | the running thread, or None before the first launch and after close |
| ``_closing`` | set by ``close``: the thread ends once ``_pending`` is empty |
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import PoolClosedError

__all__ = ["CallbackThread", "HostCall"]

#: What runs after the event: called with None, or with the error that
#: waiting for the event raised (a faulted device), which it must report.
HostCall = Callable[[BaseException | None], None]


class CallbackThread:
    """Runs functions on one daemon thread, each after its event completes, in launch order.

    Args:
        wait: Blocks until an event completes (``cupy.cuda.Event.synchronize``).
        name: The thread's name.
    """

    def __init__(self, wait: Callable[[Any], None], name: str) -> None:
        self._wait = wait
        self._name = name
        self._changed = threading.Condition(threading.Lock())
        self._pending: deque[tuple[int, Any, HostCall]] = deque()
        self._launched: dict[int, int] = {}
        self._finished: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._closing = False

    def launch(self, stream_key: int, event: Any, fn: HostCall) -> None:
        """Call ``fn(None)`` once ``event`` has completed; ``fn`` must not raise."""
        with self._changed:
            if self._closing:
                raise PoolClosedError("the pool is closed; create a new CudaStreamPool")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            self._pending.append((stream_key, event, fn))
            self._launched[stream_key] = self._launched.get(stream_key, 0) + 1
            self._changed.notify_all()

    def wait_for(self, stream_key: int) -> None:
        """Block until every function launched for ``stream_key`` so far has run."""
        if threading.current_thread() is self._thread:
            return  # a host function synchronizing: waiting for itself would never end
        with self._changed:
            target = self._launched.get(stream_key, 0)
            self._changed.wait_for(lambda: self._finished.get(stream_key, 0) >= target)

    def close(self, lock_wait: float = -1) -> None:
        """Run what is pending, then stop the thread (idempotent).

        ``lock_wait`` bounds the wait for the lock (a dropped pool's finalizer,
        which may run inside a critical section of this object on the thread
        that holds it). When it runs out, ``_closing`` is set without waking
        the thread: an idle thread then sleeps on (a daemon, it leaves with
        the process), a busy one stops once its pending functions have run.
        """
        if not self._changed.acquire(timeout=lock_wait):
            self._closing = True  # one store: read by the thread under the lock
            return
        try:
            self._closing = True
            thread = self._thread
            self._changed.notify_all()
        finally:
            self._changed.release()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _serve(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    self._thread = None
                    return
                stream_key, event, fn = self._pending.popleft()
            error: BaseException | None = None
            try:
                self._wait(event)
            except BaseException as exc:  # handed to fn, which reports it
                error = exc
            # fn is the pool's wrapper, which keeps users' errors; the thread
            # must survive anything, or every later synchronize would hang.
            with contextlib.suppress(BaseException):
                fn(error)
            with self._changed:
                self._finished[stream_key] = self._finished.get(stream_key, 0) + 1
                self._changed.notify_all()
