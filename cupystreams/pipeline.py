"""Overlapped, chunked host -> device -> host pipelines on a stream pool.

A ``Pipeline`` cuts a host array into chunks along its first axis and moves
each chunk through three stages, each on its own lease of the pool:

1. copy-in on a comm lease (host to device),
2. the user's ``fn`` on a compute lease (``fn`` launches CuPy, Numba or torch
   work on the current stream, which is the lease's),
3. copy-out on a second comm lease (device to host).

Events order the stages of one chunk; different chunks overlap, so the copy
engines and the SMs are busy at the same time. At most ``max_in_flight``
chunks are queued at once, each with its own device buffer (and page-locked
staging buffers where the caller's arrays are pageable), so memory stays
bounded whatever the input size. ``run`` returns exactly what ``run_serial``
(one stream, one chunk at a time) returns::

    pool = CudaStreamPool()
    pipe = Pipeline(pool, lambda x: cupy.sqrt(x) * 2, chunk_bytes=64 << 20)
    data = pipe.empty_host((n,), numpy.float32)   # page-locked: the fast path
    data[:] = ...
    out = pipe.run(data)

On the host backend the same code runs with numpy: the copies and ``fn`` run
as host functions on the leases' simulated streams, in stream order.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ._errors import PoolError, PoolExhaustedError
from ._events import EventPool, PooledEvent
from ._graph import CapturedGraph
from ._lease import StreamLease
from ._pipeline_engines import (
    CupyEngine,
    Destination,
    Engine,
    HostEngine,
    Pending,
    RunState,
    host_copy,
)
from ._pool import CudaStreamPool
from ._validate import check_flag, check_int

__all__ = ["DEFAULT_CHUNK_BYTES", "Pipeline", "PipelineGraph"]

DEFAULT_CHUNK_BYTES = 64 << 20


class _Slot:
    """One chunk in flight: its buffers, the events between its stages."""

    __slots__ = (
        "busy",
        "copy_back",
        "ev_comp",
        "ev_in",
        "ev_out",
        "last",
        "result",
        "stage_in",
        "stage_in_ptr",
        "stage_out",
        "stage_out_ptr",
        "x",
    )

    def __init__(self, events: EventPool) -> None:
        self.ev_in: PooledEvent = events.acquire()
        self.ev_comp: PooledEvent = events.acquire()
        self.ev_out: PooledEvent = events.acquire()
        self.last: PooledEvent | None = None  # the latest event recorded for this slot
        self.busy = False
        self.x: Any = None  # device input buffer, reused chunk after chunk
        self.stage_in: np.ndarray | None = None
        self.stage_out: np.ndarray | None = None
        self.stage_in_ptr = self.stage_out_ptr = 0  # their addresses, read once
        self.result: Pending | None = None  # kept alive until its copy-out is done
        self.copy_back: tuple[np.ndarray, np.ndarray] | None = None  # (dst, staged)

    def free(self, events: EventPool) -> None:
        for event in (self.ev_in, self.ev_comp, self.ev_out):
            events.release(event)
        self.x = self.stage_in = self.stage_out = self.result = self.copy_back = None


class _Output:
    """The result array: the caller's ``out``, or allocated from fn's first result."""

    def __init__(self, engine: Engine, rows: int, out: np.ndarray | None) -> None:
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out={type(out).__name__} must be a numpy.ndarray or None")
            if out.ndim == 0 or out.shape[0] != rows:
                raise ValueError(
                    f"out has shape {out.shape} but data has {rows} rows; out needs "
                    f"{rows} rows (fn returns one row per input row)"
                )
            if not out.flags.writeable:
                raise ValueError("out is read-only; pass a writeable array")
        self._engine = engine
        self._rows = rows
        self._lock = threading.Lock()  # the host backend's workers call view() too
        self.array = out
        # Copy straight into out when the copy engines can; else stage it.
        self.direct = out is None or engine.make_direct(out)
        # Where a direct out's rows start: its address, read once.
        self.ptr = out.ctypes.data if out is not None and self.direct else 0

    def view(self, y: Any, start: int, stop: int) -> np.ndarray:
        """Where fn's result ``y`` for rows ``start:stop`` goes; checks its shape."""
        rows = stop - start
        shape = tuple(y.shape)
        if not shape or shape[0] != rows:
            raise ValueError(
                f"fn returned shape {shape} for a chunk of {rows} rows; fn must return "
                "one row per input row (the same first dimension)"
            )
        with self._lock:
            if self.array is None:
                self.array = self._engine.host_empty((self._rows, *shape[1:]), np.dtype(y.dtype))
                self.ptr = self.array.ctypes.data
        out = self.array
        if out.shape[1:] != shape[1:] or out.dtype != y.dtype:
            raise ValueError(
                f"fn returned {y.dtype} rows of shape {shape[1:]} for rows {start}:{stop}, but "
                f"the output holds {out.dtype} rows of shape {out.shape[1:]}; fn must return "
                "the same dtype and row shape for every chunk (and match out=)"
            )
        return out[start:stop]


class Pipeline:
    """Run ``fn`` over a host array chunk by chunk, overlapping copies and compute.

    Args:
        pool: The pool to lease streams from; it needs compute and comm streams.
            Two comm streams let copy-in and copy-out overlap; with one (or when
            another thread holds the second), both directions share it.
        fn: Called as ``fn(x)`` with each chunk ``x`` on the device (a
            ``cupy.ndarray``; a ``numpy.ndarray`` on the host backend), with the
            compute lease's stream current. It must queue its work on that stream
            and return the chunk's result: one row per input row, the same dtype
            and row shape for every chunk, as a device array (CuPy, or anything
            with ``__cuda_array_interface__`` / ``__dlpack__``). On the host
            backend it runs on the stream's worker thread and returns numpy.
        chunk_bytes: Bytes of input per chunk (whole rows; at least one row).
        max_in_flight: Chunks queued at once; each holds a device input buffer,
            its result, and staging buffers for pageable arrays. Four keeps three
            stages busy with a chunk of slack.
        page_lock: Page-lock a pageable ``data`` or ``out`` in place
            (``cudaHostRegister``) the second time a run sees it, and copy
            straight from and into it from then on; the first time, and with
            False always, it is staged through page-locked buffers by host
            threads. A locked array is unlocked when it is freed, or when more
            than 16 arrays or 16 GiB are locked (least recently used first).

    Leases: a run holds its leases from start to end, as a loop written by
    hand holds its streams — a comm lease for copy-in, a second comm lease
    for copy-out when one is idle (else both directions share the first),
    and a compute lease; ``run_serial`` holds one compute lease. Per chunk it
    only records and waits on events.

    Thread safety: ``run`` and ``run_serial`` may be called from several threads
    at once; each call keeps its own buffers and waits for leases like any
    acquire.
    """

    def __init__(
        self,
        pool: CudaStreamPool,
        fn: Callable[[Any], Any],
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_in_flight: int = 4,
        page_lock: bool = True,
    ) -> None:
        if not isinstance(pool, CudaStreamPool):
            raise TypeError(f"pool={pool!r} must be a CudaStreamPool")
        if not callable(fn):
            raise TypeError(f"fn={fn!r} must be callable as fn(chunk) -> result")
        stats = pool.stats()
        if stats.compute.capacity == 0 or stats.comm.capacity == 0:
            raise ValueError(
                "a pipeline needs a pool with compute_streams >= 1 and comm_streams >= 1; "
                f"this one has {stats.compute.capacity} and {stats.comm.capacity}"
            )
        self.pool = pool
        self.fn = fn
        self.chunk_bytes = check_int("chunk_bytes", chunk_bytes, least=1)
        self.max_in_flight = check_int("max_in_flight", max_in_flight, least=1)
        self.page_lock = check_flag("page_lock", page_lock)
        backend = pool._backend
        self._engine: Engine = (
            CupyEngine(backend, page_lock) if backend.name == "cupy" else HostEngine(backend)
        )
        self._lock = threading.Lock()
        self._slots_in_use = 0

    @property
    def buffers_in_use(self) -> int:
        """Chunk slots (device buffer, result, staging) held by running calls; 0 when idle."""
        return self._slots_in_use

    def empty_host(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A host array ``run`` copies from and into directly, without staging.

        Page-locked memory from CuPy's pinned-memory pool on the cupy backend
        (returned to that pool when the array is collected); plain numpy on the
        host backend.
        """
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        return self._engine.host_empty(dims, np.dtype(dtype))

    # -- running -----------------------------------------------------------

    def run(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Apply ``fn`` to every chunk of ``data`` with the stages overlapped.

        Args:
            data: Host array, cut into chunks along its first axis.
            out: Host array for the result (``len(data)`` rows); allocated from
                fn's first result when None (page-locked on the cupy backend).

        Returns:
            The results of all chunks, in order: equal to ``run_serial(data)``.

        Raises:
            Exception: Whatever ``fn`` raises, once the work already queued has
                finished; no lease, event or buffer of the call stays held.
        """
        return self._run(data, out, serial=False)

    def run_serial(self, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The reference: every stage of every chunk on one stream, one chunk at a time.

        Each chunk's copy-out is waited for before the next chunk starts, as a
        blocking ``.get()`` would. Arguments and result as ``run``.
        """
        return self._run(data, out, serial=True)

    def _run(self, data: np.ndarray, out: np.ndarray | None, serial: bool) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            hint = (
                " (it is already on the device: call fn on it directly)"
                if hasattr(data, "__cuda_array_interface__")
                else ""
            )
            raise TypeError(f"data={type(data).__name__} must be a numpy.ndarray{hint}")
        if data.ndim == 0 or data.shape[0] == 0:
            raise ValueError(f"data has shape {data.shape}; it needs at least one row")
        row_bytes = data.itemsize * math.prod(data.shape[1:])
        rows_per_chunk = max(1, self.chunk_bytes // max(1, row_bytes))
        output = _Output(self._engine, data.shape[0], out)
        call = _Call(self, data, rows_per_chunk, output, serial)
        with self._lock:
            self._slots_in_use += call.count
        try:
            with self._engine.on_device():
                call.execute()
        finally:
            with self._lock:
                self._slots_in_use -= call.count
        assert output.array is not None  # every chunk was copied out
        return output.array

    def capture(self, data: np.ndarray, out: np.ndarray | None = None) -> PipelineGraph:
        """Run once, then capture the whole run as a CUDA graph for these very arrays.

        Most pipelines run the same shapes again and again: ``graph.run()``
        then replays every chunk's copy-in, ``fn`` and copy-out, with the
        events between them, in one launch, so the host pays a fraction of a
        microsecond per chunk. The graph reads ``data`` and writes ``out``
        (the same arrays, by address: change their contents between runs,
        never the arrays), and keeps the device buffers and ``fn``'s results
        for its own life; ``graph.close()`` frees them.

        The first run is an ordinary ``run`` (it checks ``fn``, allocates
        ``out`` when None, and loads the kernels); then the run is captured
        without being executed. ``fn`` must queue its work without waiting
        on the host (no ``.get()``, no synchronize), and allocate only from
        CuPy's allocator, which a private memory pool serves during the
        capture. Pageable arrays are page-locked in place first (the graph
        copies straight from and into them). On the host backend the graph
        replays the recorded stages serially, in the order they were
        recorded (no concurrency, no CUDA graph).

        Raises:
            ValueError: ``data`` or ``out`` cannot be page-locked, or ``fn``
                cannot be captured (the message says why).
        """
        result = self.run(data, out)
        return PipelineGraph._capture(self, data, result)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return (
            f"<Pipeline fn={name} chunk_bytes={self.chunk_bytes} "
            f"max_in_flight={self.max_in_flight} on {self.pool!r}>"
        )


class _Call:
    """One ``run``/``run_serial`` call: its chunks, slots, output and failure state."""

    def __init__(
        self, pipe: Pipeline, data: np.ndarray, step: int, output: _Output, serial: bool
    ) -> None:
        self.pool = pipe.pool
        self.fn = pipe.fn
        self.engine = pipe._engine
        self.data = data
        self.step = step
        rows = data.shape[0]
        self.chunks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        self.output = output
        self.serial = serial
        self.count = 1 if serial else min(pipe.max_in_flight, len(self.chunks))
        self.slots: list[_Slot] = []
        self.state = RunState()
        self.trace = pipe.pool._trace  # a traced pool gets a span per stage of each chunk
        # While captured as a graph (capture_graph), the run must never wait
        # on the host: a slot is reused after a device-side wait instead, and
        # every result is kept, since the graph writes it at every replay.
        self.graph_results: list[Any] | None = None

    def execute(self) -> None:
        events = self.pool.events
        leases = self._acquire_leases()
        try:
            self._loop(leases)
        except BaseException as exc:
            self.state.fail(exc)  # queued host-backend stages skip their work
            for slot in self.slots:
                if slot.last is not None:
                    with contextlib.suppress(Exception):
                        self.engine.synchronize(slot.last)  # no buffer is freed under a copy
            raise
        finally:
            for slot in self.slots:
                slot.free(events)
            for lease in dict.fromkeys(leases):  # each once: copy_out may share copy_in's
                lease.release()

    def capture_graph(self) -> tuple[CapturedGraph, list[Any]]:
        """Capture the run as a graph, without running it: the graph and what it writes.

        The copy-in lease is the capture's origin; the compute and copy-out
        leases are acquired inside the capture, so they join it, and released
        inside it, so they join back. Events and device buffers are taken
        before the capture begins (none may be created during it).
        """
        pool, events = self.pool, self.pool.events
        self.graph_results = []
        self.slots = [_Slot(events) for _ in range(self.count)]
        step, data = self.step, self.data
        for slot in self.slots:
            slot.x = self.engine.device_empty((step, *data.shape[1:]), data.dtype)
        copy_in = pool.acquire_comm()
        joined: list[StreamLease] = []
        try:
            with pool.capture(copy_in) as graph:
                joined.append(pool.acquire_compute())
                copy_out = _copy_out_lease(pool, copy_in)
                if copy_out is not copy_in:
                    joined.append(copy_out)
                self._loop((copy_in, joined[0], copy_out))
                for lease in reversed(joined):
                    lease.release()  # joins back: the origin waits for its work
        finally:
            for lease in joined:
                if not lease.released:
                    # A failure left it joined: the capture's end made it a
                    # plain lease again, which goes back now.
                    with contextlib.suppress(Exception):
                        lease.release()
            for slot in self.slots:
                slot.free(events)
            copy_in.release()
        assert graph is not None  # the origin is a lease: the capture began here
        return graph, [slot.x for slot in self.slots] + self.graph_results

    def _acquire_leases(self) -> tuple[StreamLease, StreamLease, StreamLease]:
        """(copy-in, compute, copy-out) leases held for the whole run, as a loop by
        hand holds its streams: per chunk, leasing would cost more than the copies."""
        pool = self.pool
        if self.serial:
            lease = pool.acquire_compute()
            return lease, lease, lease
        copy_in = pool.acquire_comm()
        try:
            copy_out = _copy_out_lease(pool, copy_in)
            try:
                compute = pool.acquire_compute()
            except BaseException:
                if copy_out is not copy_in:
                    copy_out.release()
                raise
        except BaseException:
            copy_in.release()
            raise
        return copy_in, compute, copy_out

    def _loop(self, leases: tuple[StreamLease, StreamLease, StreamLease]) -> None:
        engine, data, step = self.engine, self.data, self.step
        row_shape = data.shape[1:]
        direct_in = engine.make_direct(data)
        # Addresses by arithmetic: direct arrays are C-contiguous.
        base, row_bytes = (data.ctypes.data, data.strides[0]) if direct_in else (0, 0)
        for index, (start, stop) in enumerate(self.chunks):
            if len(self.slots) < self.count:
                self.slots.append(_Slot(self.pool.events))
            slot = self.slots[index % self.count]
            self._retire(slot, leases[0])  # bounds the chunks in flight
            src = data[start:stop]
            src_ptr = base + start * row_bytes
            if not direct_in:
                if slot.stage_in is None:
                    slot.stage_in = engine.host_empty((step, *row_shape), data.dtype)
                    slot.stage_in_ptr = slot.stage_in.ctypes.data
                src, src_ptr = slot.stage_in[: stop - start], slot.stage_in_ptr
                host_copy(src, data[start:stop])
            if slot.x is None:
                slot.x = engine.device_empty((step, *row_shape), data.dtype)
            self._stages(slot, src, src_ptr, self._destination(slot, start, stop), leases)
            if self.serial:
                self._retire(slot)  # as a blocking .get() would
        for slot in self.slots:
            self._retire(slot)

    def _destination(self, slot: _Slot, start: int, stop: int) -> Destination:
        output = self.output

        def destination(y: Any) -> tuple[np.ndarray, int]:
            view = output.view(y, start, stop)
            if output.direct:
                assert output.array is not None
                return view, output.ptr + start * output.array.strides[0]
            if slot.stage_out is None:
                slot.stage_out = self.engine.host_empty(
                    (self.step, *view.shape[1:]), np.dtype(view.dtype)
                )
                slot.stage_out_ptr = slot.stage_out.ctypes.data
            staged = slot.stage_out[: stop - start]
            slot.copy_back = (view, staged)
            return staged, slot.stage_out_ptr

        return destination

    def _retire(self, slot: _Slot, copy_in: StreamLease | None = None) -> None:
        """Wait until the slot's chunk is back on the host, then free the slot.

        In a capture, ``copy_in`` waits on the device instead (None at the end
        of the run: the capture's join-back orders what is left).
        """
        if slot.busy and self.graph_results is not None:
            if copy_in is not None:
                self.engine.wait(copy_in, slot.ev_out)
            self.graph_results.append(slot.result)
            slot.result = None
            slot.busy = False
        elif slot.busy:
            self.engine.synchronize(slot.ev_out)
            if slot.copy_back is not None:
                host_copy(*slot.copy_back)
            slot.copy_back = None
            slot.result = None  # the device may reuse the result's memory now
            slot.busy = False
        self.state.check()

    def _stages(
        self,
        slot: _Slot,
        src: np.ndarray,
        src_ptr: int,
        destination: Destination,
        leases: tuple[StreamLease, StreamLease, StreamLease],
    ) -> None:
        copy_in, compute, copy_out = leases
        engine, state, trace = self.engine, self.state, self.trace
        x = slot.x if src.shape[0] == self.step else slot.x[: src.shape[0]]
        span = None if trace is None else trace._stage_begin(copy_in)
        engine.copy_in(copy_in, x, src, src_ptr, state)
        if span is not None and trace is not None:
            trace._stage_end(span, "copy-in")
        engine.record(slot.ev_in, copy_in)
        slot.last = slot.ev_in
        slot.busy = True
        if compute is not copy_in:
            engine.wait(compute, slot.ev_in)
        if trace is not None:
            span = trace._stage_begin(compute)  # after the wait: the stage, not its wait
        try:
            slot.result = engine.compute(compute, self.fn, x, state)
        finally:
            # Also after a failure: fn may have queued work that reads x.
            engine.record(slot.ev_comp, compute)
            slot.last = slot.ev_comp
        if copy_out is not compute:
            engine.wait(copy_out, slot.ev_comp)
        if span is not None and trace is not None:
            trace._stage_end(span, "compute")
            span = trace._stage_begin(copy_out)
        engine.copy_out(copy_out, slot.result, destination, state)
        if span is not None and trace is not None:
            trace._stage_end(span, "copy-out")
        engine.record(slot.ev_out, copy_out)
        slot.last = slot.ev_out


def _copy_out_lease(pool: CudaStreamPool, copy_in: StreamLease) -> StreamLease:
    """A second comm lease for the copy-out if one is idle now, else ``copy_in`` itself.

    Never blocks for the second: two runs each holding one comm stream and
    waiting for the other would deadlock. A glance at the idle list first (a
    hint, read without the lock) keeps exhaustions out of the pool's counters.
    """
    if pool._comm.idle:
        with contextlib.suppress(PoolExhaustedError):
            return pool.acquire_comm(blocking=False)
    return copy_in


class PipelineGraph:
    """A ``Pipeline`` run captured as a CUDA graph: ``pipe.capture(data, out)`` makes one.

    ``run()`` replays it: every chunk's copy-in, ``fn`` and copy-out in one
    launch, on a compute lease of the pool, and returns ``out`` once done.
    The graph reads and writes the arrays it was captured for; ``run(data,
    out)`` checks that they are the same ones (an array of another shape or
    at another address is refused: capture again). ``close()`` (or leaving
    ``with graph:``) frees the graph, its device buffers and ``fn``'s results.
    Thread-safe; replays on several threads run one after another.

    On the host backend the "graph" is the host backend's: the recorded
    stages, replayed serially in the order they were recorded.
    """

    _pipe: Pipeline | None  # None once closed
    _data: np.ndarray
    _out: np.ndarray
    _lock: threading.Lock  # guards _pipe, _graph, _kept, _memory, and serializes replays
    _graph: CapturedGraph | None  # None once closed
    _kept: list[Any]  # the device buffers the graph reads and writes
    _memory: Any  # the private CuPy memory pool fn allocated from during the capture

    def __new__(cls, *_: object) -> PipelineGraph:
        raise TypeError("PipelineGraph has no public constructor; use pipe.capture(data, out)")

    @classmethod
    def _capture(cls, pipe: Pipeline, data: np.ndarray, out: np.ndarray) -> PipelineGraph:
        self: PipelineGraph = object.__new__(cls)
        self._pipe, self._data, self._out = pipe, data, out
        self._lock = threading.Lock()
        self._graph = None
        self._kept = []
        self._memory = None
        engine = pipe._engine
        for argument, array in (("data", data), ("out", out)):
            # The graph copies straight from and into host memory.
            if not (engine.make_direct(array) or engine.make_direct(array)):
                raise ValueError(
                    f"{argument} is pageable memory that could not be page-locked; a graph "
                    "copies straight from host memory: pass an array from pipe.empty_host()"
                )
        row_bytes = data.itemsize * math.prod(data.shape[1:])
        step = max(1, pipe.chunk_bytes // max(1, row_bytes))
        output = _Output(engine, data.shape[0], out)
        call = _Call(pipe, data, step, output, serial=False)
        try:
            with engine.on_device(), engine.graph_memory() as self._memory:
                self._graph, self._kept = call.capture_graph()
        except Exception as exc:
            raise ValueError(
                f"this pipeline's run cannot be captured as a CUDA graph: {exc} (fn must queue "
                "its work without waiting on the host, and allocate with CuPy)"
            ) from exc
        return self

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._pipe is None

    def run(self, data: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Replay the captured run; return ``out`` (the array it was captured with).

        Args:
            data, out: Optional: the arrays the graph was captured for, to check
                that they are (same address, shape, dtype and strides).

        Raises:
            ValueError: ``data`` or ``out`` is another array.
            PoolError: The graph was closed.
        """
        for argument, given, captured in (("data", data, self._data), ("out", out, self._out)):
            if given is not None and not _same_array(given, captured):
                raise ValueError(
                    f"{argument} is not the array this graph was captured for ({_describe(given)}"
                    f" vs {_describe(captured)}); a graph replays fixed addresses: capture "
                    f"again with pipe.capture(data, out)"
                )
        with self._lock:
            pipe = self._pipe
            if pipe is None:
                raise PoolError("this PipelineGraph was closed; capture again with pipe.capture()")
            if self._graph is None:
                raise PoolError("this PipelineGraph was closed; capture again with pipe.capture()")
            with pipe.pool.acquire_compute() as lease:
                self._graph.launch(lease)
                lease.synchronize()
        return self._out

    def close(self) -> None:
        """Free the graph, its device buffers and ``fn``'s results (idempotent)."""
        with self._lock:
            graph, memory = self._graph, self._memory
            self._pipe = self._graph = self._memory = None
            self._kept = []
        if graph is not None:
            graph.close()
        if memory is not None:
            memory.free_all_blocks()  # a CuPy memory pool of the graph's own

    def __enter__(self) -> PipelineGraph:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._pipe is None else f"{len(self._data)} rows"
        return f"<PipelineGraph {state}>"


def _same_array(given: object, captured: np.ndarray) -> bool:
    return (
        isinstance(given, np.ndarray)
        and given.ctypes.data == captured.ctypes.data
        and given.shape == captured.shape
        and given.dtype == captured.dtype
        and given.strides == captured.strides
    )


def _describe(array: object) -> str:
    if not isinstance(array, np.ndarray):
        return type(array).__name__
    return f"{array.dtype}{list(array.shape)} at {array.ctypes.data:#x}"
