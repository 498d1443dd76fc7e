"""``pool.trace()``: a device-timed span for every lease, for Perfetto and as a PNG.

While a trace is on, the pool's ``acquire_*`` methods are shadowed by
instance attributes that record a timing event on the lease's stream and hand
the lease out as a ``StreamLease`` subclass whose ``release`` records the end
event first (``release``, ``with`` and ``pool.release`` all go through it).
When the trace ends the attributes are deleted, so an untraced pool runs its
class methods, its leases are plain ``StreamLease``, and nothing on the fast
path even checks for tracing. The events are read
after the fact (``elapsed_time`` against an event recorded when the trace
began), never on the hot path. A span therefore covers the stream from the
moment the lease got it (after the work queued before) to the end of the
lease's work, including any device-side waits the lease queued.

With the ``nvtx`` package installed each lease is also an NVTX range (domain
``cupystreams``, named after the stream) from acquire to release, so Nsight
Systems shows the host side next to the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _capturing
from ._events import EventPool, PooledEvent
from ._lease import StreamLease
from ._types import StreamState

if TYPE_CHECKING:
    from ._pool import CudaStreamPool
    from ._stream import PooledStream

__all__ = ["Span", "Trace", "TraceRow", "render_timeline", "trace_pool"]

_SHADOWED = (
    "acquire_compute",
    "acquire_comm",
    "acquire_high_priority",
    "compute_context",
    "comm_context",
    "high_priority_context",
)


@dataclass(frozen=True)
class TraceRow:
    """One pooled stream, drawn as one row of the timeline."""

    stream_id: int
    kind: str
    priority: int

    @property
    def label(self) -> str:
        return f"{self.kind}#{self.stream_id} (prio {self.priority})"


@dataclass(frozen=True)
class Span:
    """One lease, or one stage of a pipeline's chunk, timed on the device.

    Attributes:
        index: Order of the acquire (or of the stage) within the trace (0 is
            the first).
        stream_id, kind, priority: The pooled stream the lease held.
        start_ms: When the stream reached the lease's first work, in ms since
            the trace began (device clock).
        end_ms: When the lease's last work finished.
        thread: Name of the host thread that acquired the lease.
        stage: ``"copy-in"``, ``"compute"`` or ``"copy-out"`` for a stage of
            a ``Pipeline`` run (whose leases each carry several stages of many
            chunks, so its stages say more than its leases); ``""`` for a lease.
    """

    index: int
    stream_id: int
    kind: str
    priority: int
    start_ms: float
    end_ms: float
    thread: str
    stage: str = ""

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class _Open:
    __slots__ = ("index", "nvtx_range", "stage", "start", "stream", "thread")

    def __init__(
        self, index: int, stream: PooledStream, start: PooledEvent, nvtx_range: Any
    ) -> None:
        self.index = index
        self.stage = ""
        self.stream = stream
        self.start = start
        self.thread = threading.current_thread().name
        self.nvtx_range = nvtx_range


class Trace:
    """The spans recorded by one ``pool.trace()`` block; read them after it ends."""

    def __init__(self, pool: CudaStreamPool) -> None:
        self._backend = pool._backend
        self.backend = pool.backend
        self.device = pool.device
        self.rows = [TraceRow(s.stream_id, s.kind.value, s.priority) for s in pool._streams]
        #: Leases still held when the trace ended (or whose pool closed): not spans.
        self.unfinished = 0
        self._events = EventPool(initial_size=0, max_size=256, timing=True, backend=self._backend)
        self._counter = itertools.count()
        # Leases are acquired and released on any thread: _lock guards _open,
        # _closed, _staged, _counter and unfinished.
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._staged: set[int] = set()  # leases whose stages are spans: not spans themselves
        self._closed: list[tuple[_Open, PooledEvent]] = []
        self._spans: list[Span] | None = None
        self._nvtx = _load_nvtx()
        # t = 0: an event on a private idle stream fires as soon as it is
        # recorded, before any event recorded later on a pool stream.
        self._origin_stream = self._backend.create_stream(pool.priority_range[0], True)
        self._origin = self._events.acquire()
        self._backend.record(self._origin._handle, self._origin_stream)

    @property
    def spans(self) -> list[Span]:
        """The spans in acquire order; available once the ``with`` block ended."""
        if self._spans is None:
            raise RuntimeError("the trace is still recording; read spans after its with block")
        return self._spans

    # -- recording (called through the shadowed pool methods) ---------------

    def _begin(self, lease: StreamLease) -> None:
        stream = lease._stream
        assert stream is not None  # a lease that was just acquired
        event = self._events.acquire()
        self._backend.record(event._handle, stream._handle)
        nvtx_range = None
        if self._nvtx is not None:
            name = f"{stream.kind.value}#{stream.stream_id}"
            nvtx_range = self._nvtx.start_range(message=name, domain="cupystreams")
        with self._lock:
            self._open[id(lease)] = _Open(next(self._counter), stream, event, nvtx_range)

    def _stage_begin(self, lease: StreamLease) -> _Open:
        """Start a stage span on ``lease`` (a pipeline's chunk); end it with ``_stage_end``."""
        stream = lease._stream
        assert stream is not None  # a lease the run holds
        event = self._events.acquire()
        self._backend.record(event._handle, stream._handle)
        with self._lock:
            self._staged.add(id(lease))
            return _Open(next(self._counter), stream, event, None)

    def _stage_end(self, entry: _Open, stage: str) -> None:
        end = self._events.acquire()
        self._backend.record(end._handle, entry.stream._handle)
        entry.stage = stage
        with self._lock:
            self._closed.append((entry, end))

    def _end(self, lease: StreamLease) -> None:
        with self._lock:
            entry = self._open.pop(id(lease), None)
            staged = id(lease) in self._staged
            self._staged.discard(id(lease))
        if entry is None:
            return  # released already, or the trace ended first
        if staged:
            self._events.release(entry.start)  # its stages are its spans
            if self._nvtx is not None:
                self._nvtx.end_range(entry.nvtx_range)
            return
        stream = entry.stream
        if stream.state is StreamState.CLOSED:
            self._drop(entry)
            return
        if stream._backend.is_capturing(stream._handle):
            # The release will fail; an event recorded now would join the graph.
            with self._lock:
                self._open[id(lease)] = entry
            return
        end = self._events.acquire()
        self._backend.record(end._handle, stream._handle)
        if self._nvtx is not None:
            self._nvtx.end_range(entry.nvtx_range)
        with self._lock:
            self._closed.append((entry, end))

    def _drop(self, entry: _Open) -> None:
        with self._lock:
            self.unfinished += 1
        self._events.release(entry.start)
        if self._nvtx is not None:
            self._nvtx.end_range(entry.nvtx_range)

    def _finish(self) -> None:
        # Swap the containers out first: other threads may still be releasing
        # traced leases while the block ends.
        with self._lock:
            still_open, self._open = self._open, {}
            finished, self._closed = self._closed, []
        for entry in still_open.values():
            self._drop(entry)
        backend, origin = self._backend, self._origin
        origin.synchronize()  # a host-backend stream may not have reached it yet
        spans = []
        for entry, end in sorted(finished, key=lambda item: item[0].index):
            end.synchronize()
            entry.start.synchronize()
            spans.append(
                Span(
                    index=entry.index,
                    stream_id=entry.stream.stream_id,
                    kind=entry.stream.kind.value,
                    priority=entry.stream.priority,
                    start_ms=backend.elapsed_time(origin._handle, entry.start._handle),
                    end_ms=backend.elapsed_time(origin._handle, end._handle),
                    thread=entry.thread,
                    stage=entry.stage,
                )
            )
            self._events.release(entry.start)
            self._events.release(end)
        # Host-backend clocks are read by different worker threads and can
        # disagree by microseconds: keep t = 0 the earliest instant seen.
        shift = min([0.0, *(span.start_ms for span in spans)])
        if shift < 0:
            spans = [
                dataclasses.replace(s, start_ms=s.start_ms - shift, end_ms=s.end_ms - shift)
                for s in spans
            ]
        self._events.release(origin)
        self._events._close("the trace ended")
        backend.destroy_stream(self._origin_stream)
        self._spans = spans

    # -- export ------------------------------------------------------------

    def to_chrome(self) -> dict[str, Any]:
        """The trace in Chrome's Trace Event format (opens in Perfetto)."""
        pid = self.device
        events: list[dict[str, Any]] = [
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "args": {"name": f"cupystreams {self.backend} device {self.device}"},
            }
        ]
        for lane in self.rows:
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": pid,
                    "tid": lane.stream_id,
                    "args": {"name": lane.label},
                }
            )
            events.append(
                {
                    "name": "thread_sort_index",
                    "ph": "M",
                    "pid": pid,
                    "tid": lane.stream_id,
                    "args": {"sort_index": lane.stream_id},
                }
            )
        for span in self.spans:
            events.append(
                {
                    "name": f"{span.kind}#{span.stream_id} lease {span.index}",
                    "cat": span.kind,
                    "ph": "X",
                    "ts": span.start_ms * 1e3,
                    "dur": span.duration_ms * 1e3,
                    "pid": pid,
                    "tid": span.stream_id,
                    "args": {"priority": span.priority, "host_thread": span.thread},
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome_trace(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_chrome()`` as JSON (open it at ui.perfetto.dev)."""
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_chrome(), file)

    def save_timeline(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Draw the spans as a PNG: one lane per pooled stream."""
        render_timeline(path, [(title or f"{self.backend} device {self.device}", self)])

    def __repr__(self) -> str:
        if self._spans is None:
            return f"<Trace recording, {len(self._closed)} spans so far>"
        return f"<Trace {len(self._spans)} spans, {self.unfinished} unfinished>"


def _load_nvtx() -> Any:
    try:
        return importlib.import_module("nvtx")
    except ImportError:
        return None


def render_timeline(
    path: str | os.PathLike[str], panels: Sequence[tuple[str, Trace]], xlabel: str | None = None
) -> None:
    """Draw several traces as stacked timelines, each on its own time scale.

    One row per pooled stream, one bar per lease, coloured by the stream's
    kind (the legend names them). Each panel spans its own trace, so a 20 ms
    pipeline next to a 300 ms flood is not a sliver.

    Args:
        path: Where to write the PNG.
        panels: ``(title, trace)`` pairs, drawn top to bottom.
        xlabel: Label of the time axes (default ``"device time (ms)"``).
    """
    from ._bench.timeline import Bar, Panel, draw_timeline

    drawn = []
    for title, trace in panels:
        labels = {lane.stream_id: lane.label for lane in trace.rows}
        bars = tuple(
            Bar(labels[s.stream_id], s.stage or f"{s.kind} lease", s.start_ms, s.end_ms)
            for s in trace.spans
        )
        drawn.append(Panel(title, tuple(labels.values()), bars))
    draw_timeline(path, drawn, xlabel or "device time (ms)")


@contextlib.contextmanager
def trace_pool(pool: CudaStreamPool) -> Iterator[Trace]:
    """Shadow ``pool``'s acquire methods with traced ones for the ``with`` block."""
    if (error := pool._core.closed_error()) is not None:
        raise error
    if pool._captures.busy():
        raise RuntimeError(
            "this pool is capturing a CUDA graph (pool.capture()); trace it after the "
            "capture: the trace's timing events would be captured into the graph"
        )
    if any(name in vars(pool) for name in _SHADOWED):
        raise RuntimeError("this pool is already being traced; one trace at a time per pool")
    _capturing.refuse(
        pool.backend,
        pool.device,
        "starting a trace (it creates a stream and events)",
        "trace after it",
    )
    trace = Trace(pool)
    leases = _traced_lease_class(trace)
    for name in _SHADOWED:
        setattr(pool, name, _traced_acquire(getattr(pool, name), trace, leases))
    pool._trace = trace  # a Pipeline run traces its stages
    try:
        yield trace
    finally:
        pool._trace = None
        for name in _SHADOWED:
            delattr(pool, name)
        trace._finish()


def _traced_lease_class(trace: Trace) -> type[StreamLease]:
    class TracedLease(StreamLease):
        """A lease of a traced pool: its end is recorded before its stream goes back."""

        __slots__ = ()  # the same layout, so a lease's class can be switched

        def release(self) -> None:
            if self._stream is not None:
                trace._end(self)
            StreamLease.release(self)

    return TracedLease


def _traced_acquire(
    acquire: Callable[..., StreamLease], trace: Trace, leases: type[StreamLease]
) -> Callable[..., StreamLease]:
    @functools.wraps(acquire)
    def traced(*args: Any, **kwargs: Any) -> StreamLease:
        lease = acquire(*args, **kwargs)
        trace._begin(lease)
        lease.__class__ = leases
        return lease

    return traced
