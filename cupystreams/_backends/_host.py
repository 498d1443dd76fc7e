"""The host backend: CUDA's stream semantics simulated with host threads.

Each stream is a FIFO run by its own worker thread; an event marks a position
in a stream, and ``wait_event`` enqueues a task that blocks the waiting stream
until that position has run. Each device has a legacy default stream, shared
by every host-backend pool of the process and named by pointer 0 as in CUDA,
so that code written for the GPU (``record_event(None)``, ``wait(0)``) runs
unchanged. Streams can be captured into graphs by CUDA's rules
(``_host_graph``). It exists so that pool logic and users' pipeline
code can be tested without a GPU, and never passes itself off as CUDA: its
streams have no device pointer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from .._errors import PoolClosedError
from ._callbacks import HostCall
from ._host_graph import CapturePoint, HostCapture, HostGraph

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
    """A FIFO of host callables executed in order by one daemon thread.

    While it takes part in a capture (``capture`` is set), submitted tasks are
    recorded into the capture instead of run.
    """

    def __init__(self, priority: int, name: str) -> None:
        self.priority = priority
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        # Guards _submitted and _stopped (and orders the queue), and capture.
        self._lock = threading.Lock()
        self._stopped = False
        self._submitted = 0
        self._completed = 0
        self.capture: HostCapture | None = None
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, task: _Task, refused: str | None = None) -> None:
        """Queue ``task``, or record it into the stream's capture; ``refused`` names
        what a capturing stream refuses instead (checked in the same step)."""
        with self._lock:
            if self._stopped:
                # A call that raced close(): as a destroyed CUDA stream would
                # be, this one is unusable, and nothing may wait on it for ever.
                raise PoolClosedError("the pool is closed; create a new CudaStreamPool")
            capture = self.capture
            if capture is not None and refused is not None:
                self._refuse(capture, refused)
            if capture is not None and capture.record_task(self, task):
                return
            self._submitted += 1
            self._tasks.put(task)

    def is_capturing(self) -> bool:
        return self.current_capture() is not None

    def current_capture(self) -> HostCapture | None:
        with self._lock:
            return self.capture

    def begin_capture(self) -> None:
        with self._lock:
            if self.capture is not None:
                raise RuntimeError(f"{self!r} is capturing already")
            self.capture = HostCapture(self)

    def end_capture(self) -> HostGraph:
        """End the capture this stream began; every stream of it leaves capture mode."""
        with self._lock:
            capture = self.capture
        if capture is None or capture.origin is not self:
            raise RuntimeError(f"{self!r} did not begin a capture; end it on its origin")
        streams, graph = capture.finish()
        for member in streams:
            member.leave(capture)
        if isinstance(graph, str):
            raise RuntimeError(graph)
        return graph

    def capture_point(self) -> CapturePoint | None:
        """Where this stream is in its capture, or None when it is not capturing."""
        with self._lock:
            return None if self.capture is None else self.capture.point(self)

    def wait_mark(self, mark: _Mark) -> None:
        """Later tasks wait until ``mark`` fires (an event recorded outside any capture)."""
        with self._lock:
            capture = self.capture
            if capture is None:
                self._submitted += 1
                self._tasks.put(mark.reached)
                return
        capture.invalidate(f"{self!r} waited on an event recorded outside the capture")
        raise RuntimeError(
            "a capturing stream cannot wait on an event recorded outside its capture "
            "(CUDA: cudaErrorStreamCaptureIsolation); record the event inside the capture"
        )

    def join(self, point: CapturePoint) -> None:
        """Wait for an event recorded in a capture: join it, or join back to it."""
        with self._lock:
            capture = self.capture
            if capture is not None and capture is not point.capture:
                capture.invalidate(f"{self!r} waited on an event of another capture")
                raise RuntimeError(
                    "a capturing stream cannot wait on an event recorded in another capture"
                )
            point.capture.join_locked(self, point.tasks)
            self.capture = point.capture

    def leave(self, capture: HostCapture) -> None:
        """The capture ended: tasks run again."""
        with self._lock:
            if self.capture is capture:
                self.capture = None

    def refuse_if_capturing(self, what: str) -> None:
        """As CUDA: synchronizing or querying a capturing stream invalidates its capture."""
        with self._lock:
            capture = self.capture
        if capture is not None:
            self._refuse(capture, what)

    def _refuse(self, capture: HostCapture, what: str) -> NoReturn:
        capture.invalidate(f"{what} of {self!r}")
        raise RuntimeError(
            f"{self!r} is capturing a graph: it cannot be synchronized or queried "
            "(that invalidates the capture, as in CUDA); do it after the capture ends"
        )

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            # Tasks are the pool's own wrappers and never raise; a user's host
            # function is wrapped by the pool, which keeps its exception.
            task()
            self._completed += 1

    def idle(self) -> bool:
        self.refuse_if_capturing("a query")
        with self._lock:
            # _completed is written by the worker alone; a stale read only
            # answers "busy" a moment longer.
            return self._completed == self._submitted

    def synchronize(self) -> None:
        if threading.current_thread() is self._worker:
            # One of its own tasks (a collection there closing the stream's
            # pool): what came before is done, and waiting for itself never ends.
            return
        mark = _Mark()
        # Checked as the mark is queued: a stream pulled into a capture between
        # a check and the queueing would record the mark, which never fires.
        self.submit(mark.fire, refused="a synchronization")
        mark.done.wait()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._tasks.put(None)
        if threading.current_thread() is not self._worker:  # as in synchronize()
            self._worker.join()

    def __repr__(self) -> str:
        return f"<HostStream priority={self.priority} thread={self._worker.name}>"


class HostEvent:
    """An event: the most recent mark recorded into it (None until recorded).

    Recorded on a capturing stream, it holds a position in the capture instead.
    """

    __slots__ = ("mark", "timing")

    def __init__(self, timing: bool) -> None:
        self.timing = timing
        self.mark: _Mark | CapturePoint | None = None

    def completed_mark(self) -> _Mark | None:
        """The mark to wait for on the host; an event recorded in a capture has none."""
        mark = self.mark
        if isinstance(mark, CapturePoint):
            if mark.capture.ended():
                return None  # nothing will ever run there: like an unrecorded event
            raise RuntimeError(
                "the event was recorded during a capture: it cannot be queried or waited "
                "for on the host (as in CUDA); launch the graph and record an event then"
            )
        return mark


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
        point = stream.capture_point()
        if point is not None:
            event.mark = point
            return
        mark = _Mark()
        event.mark = mark
        stream.submit(mark.fire)

    def wait_event(self, stream: HostStream, event: HostEvent) -> None:
        mark = event.mark
        if isinstance(mark, CapturePoint):
            if not mark.capture.ended():
                stream.join(mark)
            # else: nothing of an ended capture will run; like an unrecorded event
        elif mark is not None:  # as in CUDA, an unrecorded event is complete
            stream.wait_mark(mark)

    def query_stream(self, stream: HostStream) -> bool:
        return stream.idle()

    def synchronize_stream(self, stream: HostStream) -> None:
        stream.synchronize()

    def query_event(self, event: HostEvent) -> bool:
        mark = event.completed_mark()
        return mark is None or mark.done.is_set()

    def synchronize_event(self, event: HostEvent) -> None:
        mark = event.completed_mark()
        if mark is not None:
            mark.done.wait()

    def elapsed_time(self, start: HostEvent, end: HostEvent) -> float:
        first, last = start.completed_mark(), end.completed_mark()
        if first is None or last is None:
            raise ValueError("elapsed_time needs both events recorded first")
        if not (first.done.is_set() and last.done.is_set()):
            raise ValueError("elapsed_time needs both events completed: synchronize first")
        return (last.timestamp - first.timestamp) * 1e3

    def launch_host_func(self, stream: HostStream, fn: HostCall) -> None:
        stream.submit(lambda: fn(None))  # on the stream's worker, a thread of the library

    def is_capturing(self, stream: HostStream) -> bool:
        return stream.is_capturing()

    def capture_id(self, stream: HostStream) -> int | None:
        capture = stream.current_capture()
        return None if capture is None else id(capture)

    def capture_probe(self, stream: HostStream) -> Callable[[], int]:
        return stream.is_capturing

    def begin_capture(self, stream: HostStream) -> None:
        if stream is self.default_stream():
            raise RuntimeError("the legacy default stream cannot be captured (as in CUDA)")
        stream.begin_capture()

    def end_capture(self, stream: HostStream) -> HostGraph:
        return stream.end_capture()

    def launch_graph(self, graph: HostGraph, stream: HostStream) -> None:
        stream.submit(graph.run)

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

    def close(self, lock_wait: float = -1) -> None:
        pass  # each stream's worker stops with destroy_stream
