"""The host backend: CUDA's stream semantics simulated with host threads.

Each stream is a FIFO run by its own worker thread; an event marks a position
in a stream, and ``wait_event`` enqueues a task that blocks the waiting stream
until that position has run. Each device has a legacy default stream, shared
by every host-backend pool of the process and named by pointer 0 as in CUDA,
so that code written for the GPU (``record_event(None)``, ``wait(0)``) runs
unchanged. It exists so that pool logic and users' pipeline
code can be tested without a GPU, and never passes itself off as CUDA: its
streams have no device pointer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import PoolClosedError
from ._callbacks import HostCall

__all__ = ["HostBackend", "HostEvent", "HostStream", "legacy_stream"]

_Task = Callable[[], None]


class _Mark:
    """One recorded position: set when the stream's worker reaches it."""

    __slots__ = ("done", "timestamp")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.timestamp = 0.0

    def reached(self) -> None:
        """Block until the mark fires (run by a waiting stream's worker)."""
        self.done.wait()

    def fire(self) -> None:
        self.timestamp = time.perf_counter()
        self.done.set()


class HostStream:
    """A FIFO of host callables executed in order by one daemon thread."""

    def __init__(self, priority: int, name: str) -> None:
        self.priority = priority
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _submitted and _stopped (and orders the queue)
        self._stopped = False
        self._submitted = 0
        self._completed = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, task: _Task) -> None:
        with self._lock:
            if self._stopped:
                # A call that raced close(): as a destroyed CUDA stream would
                # be, this one is unusable, and nothing may wait on it for ever.
                raise PoolClosedError("the pool is closed; create a new CudaStreamPool")
            self._submitted += 1
            self._tasks.put(task)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            # Tasks are the pool's own wrappers and never raise; a user's host
            # function is wrapped by the pool, which keeps its exception.
            task()
            self._completed += 1

    def idle(self) -> bool:
        with self._lock:
            # _completed is written by the worker alone; a stale read only
            # answers "busy" a moment longer.
            return self._completed == self._submitted

    def synchronize(self) -> None:
        mark = _Mark()
        self.submit(mark.fire)
        mark.done.wait()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._tasks.put(None)
        self._worker.join()

    def __repr__(self) -> str:
        return f"<HostStream priority={self.priority} thread={self._worker.name}>"


class HostEvent:
    """An event: the most recent mark recorded into it (None until recorded)."""

    __slots__ = ("mark", "timing")

    def __init__(self, timing: bool) -> None:
        self.timing = timing
        self.mark: _Mark | None = None


_legacy_lock = threading.Lock()  # guards _legacy_streams
_legacy_streams: dict[int, HostStream] = {}


def legacy_stream(device: int) -> HostStream:
    """The legacy default stream of host ``device``, created on first use."""
    with _legacy_lock:
        stream = _legacy_streams.get(device)
        if stream is None:
            stream = _legacy_streams[device] = HostStream(0, f"cupystreams-legacy-stream-{device}")
        return stream


def _forget_legacy_streams_after_fork() -> None:
    global _legacy_lock
    _legacy_lock = threading.Lock()  # a parent thread may have held it at fork
    _legacy_streams.clear()  # their worker threads do not exist in the child


os.register_at_fork(after_in_child=_forget_legacy_streams_after_fork)


class HostBackend:
    """Streams and events on host threads; see the module docstring."""

    name = "host"

    def __init__(self, device: int | None = None) -> None:
        self.device = 0 if device is None else device
        self._current = threading.local()
        self._serial = 0

    def priority_range(self) -> tuple[int, int]:
        # The range of current NVIDIA GPUs, so code written against the host
        # backend sees realistic numbers.
        return (0, -5)

    def hardware_queues(self) -> int | None:
        return None

    def create_stream(self, priority: int, non_blocking: bool) -> HostStream:
        self._serial += 1
        return HostStream(priority, name=f"cupystreams-host-{self._serial}")

    def destroy_stream(self, stream: HostStream) -> None:
        stream.synchronize()
        stream.stop()

    def stream_ptr(self, stream: HostStream) -> int:
        raise TypeError(
            "host-backend streams are simulated on host threads and have no CUDA "
            "stream pointer; use backend='cupy' for work that needs one"
        )

    def create_event(self, timing: bool) -> HostEvent:
        return HostEvent(timing)

    def record(self, event: HostEvent, stream: HostStream) -> None:
        mark = _Mark()
        event.mark = mark
        stream.submit(mark.fire)

    def wait_event(self, stream: HostStream, event: HostEvent) -> None:
        mark = event.mark
        if mark is not None:  # as in CUDA, an unrecorded event is complete
            stream.submit(mark.reached)

    def query_stream(self, stream: HostStream) -> bool:
        return stream.idle()

    def synchronize_stream(self, stream: HostStream) -> None:
        stream.synchronize()

    def query_event(self, event: HostEvent) -> bool:
        return event.mark is None or event.mark.done.is_set()

    def synchronize_event(self, event: HostEvent) -> None:
        if event.mark is not None:
            event.mark.done.wait()

    def elapsed_time(self, start: HostEvent, end: HostEvent) -> float:
        if start.mark is None or end.mark is None:
            raise ValueError("elapsed_time needs both events recorded first")
        if not (start.mark.done.is_set() and end.mark.done.is_set()):
            raise ValueError("elapsed_time needs both events completed: synchronize first")
        return (end.mark.timestamp - start.mark.timestamp) * 1e3

    def launch_host_func(self, stream: HostStream, fn: HostCall) -> None:
        stream.submit(lambda: fn(None))  # on the stream's worker, a thread of the library

    def is_capturing(self, stream: HostStream) -> bool:
        return False

    def capture_probe(self, stream: HostStream) -> None:
        return None

    def default_stream(self) -> HostStream:
        return legacy_stream(self.device)

    def current_stream(self) -> HostStream:
        current = getattr(self._current, "stream", None)
        return self.default_stream() if current is None else current

    def enter(self, stream: HostStream) -> Any:
        previous = getattr(self._current, "stream", None)
        self._current.stream = stream
        return previous

    def exit(self, token: Any) -> None:
        self._current.stream = token

    def as_stream(self, obj: object) -> Any:
        if obj == 0 and type(obj) is int:
            return self.default_stream()
        raise TypeError(
            "the host backend has no CUDA streams, only its legacy default stream 0 "
            "(use backend='cupy' for CUDA streams)"
        )

    def close(self) -> None:
        pass  # each stream's worker stops with destroy_stream
