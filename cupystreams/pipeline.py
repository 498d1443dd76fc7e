"""Overlapped, chunked host -> device -> host pipelines on a stream pool.

A ``Pipeline`` cuts a host array into chunks along its first axis and moves
each chunk through three stages, each on its own lease of the pool:

1. copy-in on a comm lease (host to device),
2. the user's ``fn`` on a compute lease (``fn`` launches CuPy, Numba or torch
   work on the current stream, which is the lease's),
3. copy-out on a second comm lease (device to host).

Events order the stages of one chunk; different chunks overlap, so the copy
engines and the SMs are busy at the same time. Chunks smaller than
``min_copy_bytes`` are copied in groups of consecutive chunks (``fn`` still
sees one chunk at a time). At most ``max_in_flight`` groups are queued at
once, each with its own device buffers (and page-locked staging buffers
where the caller's arrays are pageable), so memory stays bounded whatever
the input size; between runs the pipeline keeps at most that many groups'
buffers for its next run of the same shapes. ``run`` returns exactly what
``run_serial`` (one stream, one chunk at a time) returns::

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
import weakref
from collections.abc import Callable, Iterator
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
from ._pipeline_shelf import InputShape, OutputShape, Shelf, SlotBuffers
from ._pool import CudaStreamPool
from ._validate import check_flag, check_int

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_MIN_COPY_BYTES", "Pipeline", "PipelineGraph"]

DEFAULT_CHUNK_BYTES = 64 << 20
#: Copies move at least this much when chunks are smaller. Each copy costs the
#: host 5-10 µs (the call, its events, the wait before its buffer is reused)
#: and the copy engine about 3 µs; 8 MiB take about 170 µs over PCIe 5, so the
#: fixed costs stay a few percent of a copy's time. (On an H200, 4 MiB left
#: 1 MiB chunks behind a loop written by hand; 16 MiB delayed 8 MiB chunks.)
DEFAULT_MIN_COPY_BYTES = 8 << 20
#: The most compute leases a captured graph spreads a group's chunks over.
GRAPH_COMPUTE_LEASES = 4


class _Slot:
    """One copy group in flight: its buffers, and the events between its stages.

    A group is one chunk, or several consecutive ones that are copied in and
    out together (``Pipeline``'s ``min_copy_bytes``).
    """

    __slots__ = (
        "busy",
        "chunks",
        "copy_back",
        "ev_comp",
        "ev_in",
        "ev_out",
        "events",
        "gathered",
        "output_shape",
        "results",
        "stage_in",
        "stage_in_ptr",
        "stage_out",
        "stage_out_ptr",
        "x",
    )
    ev_in: PooledEvent
    ev_out: PooledEvent
    ev_comp: list[PooledEvent]  # one per compute lease of the run

    def __init__(self, shelved: SlotBuffers | None = None) -> None:
        # The events come with the slot's first copy (take_events): the first
        # group's copy-in is queued before them, while the device waits.
        self.events: list[PooledEvent] = []
        self.busy = False
        self.results: list[Pending] = []  # kept alive until their copy-out is done
        self.copy_back: tuple[np.ndarray, np.ndarray] | None = None  # (dst, staged)
        # Buffers, reused group after group; from the pipeline's shelf when
        # its last run had groups of these shapes.
        self.x: Any = None  # device input buffer
        self.chunks: list[Any] = []  # views of x that fn gets, made once (CuPy slicing is slow)
        self.gathered: Any = None  # device buffer a group's results are gathered into
        self.stage_in: np.ndarray | None = None
        self.stage_out: np.ndarray | None = None
        self.stage_in_ptr = self.stage_out_ptr = 0  # their addresses, read once
        self.output_shape: OutputShape | None = None  # what gathered and stage_out are made for
        if shelved is not None:
            self.x, self.chunks = shelved.x, shelved.chunks
            self.stage_in, self.stage_in_ptr = shelved.stage_in, shelved.stage_in_ptr
            self.gathered = shelved.gathered
            self.stage_out, self.stage_out_ptr = shelved.stage_out, shelved.stage_out_ptr
            self.output_shape = shelved.output_shape

    def take_events(self, events: EventPool, computes: int) -> None:
        """Take the events between the group's stages: one for its copy-in, one
        for its copy-out, one per compute lease (all or none)."""
        taken: list[PooledEvent] = []
        try:
            for _ in range(computes + 2):
                taken.append(events.acquire())
        except BaseException:
            for event in taken:
                events.release(event)
            raise
        self.events = taken
        self.ev_in, self.ev_out, *self.ev_comp = taken

    def fit_output(self, shape: OutputShape) -> None:
        """Let the output side go if it was made for another output than ``shape``;
        from now on it is ``shape``'s (the slot's group is home)."""
        if self.output_shape != shape:
            self.gathered = self.stage_out = None
            self.stage_out_ptr = 0
        self.output_shape = shape

    def shelve(self, input_shape: InputShape, output_shape: OutputShape) -> SlotBuffers:
        """The slot's buffers, for the pipeline's next run (its group is home).

        Staging buffers stay too when this run did not use them (its arrays
        were page-locked in place): let go, they would only go back to
        CuPy's pinned-memory pool, which keeps them page-locked all the same,
        and the next pageable array would take them from there again.
        """
        self.fit_output(output_shape)
        return SlotBuffers(
            input_shape,
            output_shape,
            self.x,
            self.chunks,
            self.stage_in,
            self.stage_in_ptr,
            self.gathered,
            self.stage_out,
            self.stage_out_ptr,
        )

    def free(self, events: EventPool) -> None:
        taken, self.events = self.events, []
        for event in taken:
            events.release(event)
        self.x = self.gathered = self.stage_in = self.stage_out = self.copy_back = None
        self.results = []
        self.chunks = []


class _Output:
    """The result array: the caller's ``out``, or allocated from fn's first result."""

    def __init__(self, engine: Engine, rows: int, out: np.ndarray | None, holds: list[Any]) -> None:
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
        # Copy straight into out when the copy engines can (at its address,
        # where its rows start); else stage it.
        address = None if out is None else engine.direct_address(out, holds)
        self.direct = out is None or address is not None
        self.ptr = address or 0

    def view(self, y: Any, start: int, stop: int) -> np.ndarray:
        """Where fn's result ``y`` for rows ``start:stop`` goes; checks it first.

        The first result allocates the output when the caller passed none.
        """
        _check_rows(y, start, stop)
        with self._lock:
            if self.array is None:
                shape = tuple(y.shape)
                self.array = self._engine.host_empty((self._rows, *shape[1:]), np.dtype(y.dtype))
                self.ptr = self.array.ctypes.data
        self.check(y, start, stop)
        return self.array[start:stop]

    def check(self, y: Any, start: int, stop: int) -> None:
        """Refuse a result for rows ``start:stop`` that does not fit the output."""
        out = self.array
        assert out is not None  # allocated by the first result's view()
        shape = tuple(y.shape)
        fits = shape and shape[0] == stop - start and shape[1:] == out.shape[1:]
        if fits and y.dtype == out.dtype:
            return  # the common case first, in one test: this runs for every chunk
        _check_rows(y, start, stop)
        if out.shape[1:] != shape[1:] or out.dtype != y.dtype:
            raise ValueError(
                f"fn returned {y.dtype} rows of shape {shape[1:]} for rows {start}:{stop}, but "
                f"the output holds {out.dtype} rows of shape {out.shape[1:]}; fn must return "
                "the same dtype and row shape for every chunk (and match out=)"
            )


def _check_rows(y: Any, start: int, stop: int) -> None:
    rows = stop - start
    shape = tuple(y.shape)
    if not shape or shape[0] != rows:
        raise ValueError(
            f"fn returned shape {shape} for a chunk of {rows} rows; fn must return "
            "one row per input row (the same first dimension)"
        )


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
        max_in_flight: Copy groups queued at once; each holds a device input
            buffer, its results, and staging buffers for pageable arrays. Four
            keeps three stages busy with a group of slack. Also the most
            groups' buffers kept between runs (and, with a run's, in all).
        min_copy_bytes: Chunks smaller than this (8 MiB) are copied to and from the
            device in groups of consecutive chunks moving at least this many
            bytes (fn still sees one chunk at a time; its results are gathered
            on the device into one buffer per group). A copy has a fixed cost
            of a few microseconds, on the host and on the copy engine, which
            dominates small chunks. 0: one copy per chunk.
        page_lock: Page-lock a pageable ``data`` or ``out`` in place
            (``cudaHostRegister``) the second time a run sees it, and copy
            straight from and into it from then on; the first time, and with
            False always, it is staged through page-locked buffers by host
            threads (an array already page-locked, by anyone, is copied
            directly). A locked array is unlocked when it is freed, or when
            more than 16 arrays or 16 GiB are locked: the one locked earliest
            that no run or graph is using goes first (with none, the new array
            is staged instead).

    Leases: ``run`` holds a comm lease for copy-in, a second comm lease for
    copy-out when one is idle (else both directions share the first), and a
    compute lease. It takes the copy-in lease first and the others once its
    first copy is queued, and gives all back once its last copy-out is
    queued, so that the device copies while the host takes and returns them.
    In between, as a loop written by hand, it only records and waits on
    events per copy group, and calls ``fn`` per chunk. ``run_serial`` holds
    one compute lease from start to end.

    Buffers: a run that ends well leaves its copy groups' device and staging
    buffers with the pipeline (``buffers_kept``), and the next run whose
    groups have the same shapes starts copying into them at once, as a loop
    written by hand reuses its own. Kept and running groups stay within
    ``max_in_flight`` per run: a run of other shapes lets the oldest kept
    ones go first. No lease or event is kept between runs; a failed run
    keeps nothing, and ``capture`` lets them go (the graph has its own).
    ``release_buffers()`` gives them back to CuPy's memory pools.

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
        min_copy_bytes: int = DEFAULT_MIN_COPY_BYTES,
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
        self.chunk_bytes = chunk_bytes  # checked by the properties' setters below
        self.max_in_flight = max_in_flight
        self.min_copy_bytes = min_copy_bytes
        self._page_lock = check_flag("page_lock", page_lock)
        backend = pool._backend
        self._engine: Engine = (
            CupyEngine(backend, self._page_lock) if backend.name == "cupy" else HostEngine(backend)
        )
        self._lock = threading.Lock()  # guards _slots_in_use
        self._slots_in_use = 0
        self._shelf = Shelf()

    # The sizes may change between runs (a run reads them once, at its start);
    # each is checked as it is set, so a bad one fails there, naming itself.
    @property
    def chunk_bytes(self) -> int:
        """Bytes of input per chunk (whole rows; at least one row)."""
        return self._chunk_bytes

    @chunk_bytes.setter
    def chunk_bytes(self, value: int) -> None:
        self._chunk_bytes = check_int("chunk_bytes", value, least=1)

    @property
    def max_in_flight(self) -> int:
        """Copy groups queued at once, and the most groups' buffers kept between runs."""
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._max_in_flight = check_int("max_in_flight", value, least=1)

    @property
    def min_copy_bytes(self) -> int:
        """Chunks smaller than this are copied in groups moving at least this much."""
        return self._min_copy_bytes

    @min_copy_bytes.setter
    def min_copy_bytes(self, value: int) -> None:
        self._min_copy_bytes = check_int("min_copy_bytes", value, least=0)

    @property
    def page_lock(self) -> bool:
        """Whether pageable arrays are page-locked in place (fixed at construction)."""
        return self._page_lock

    @property
    def buffers_in_use(self) -> int:
        """Copy-group slots (device buffers, results, staging) held by running calls;
        0 when idle (idle buffers kept for the next run: ``buffers_kept``)."""
        return self._slots_in_use

    @property
    def buffers_kept(self) -> int:
        """Copy groups whose buffers the pipeline keeps for its next run (idle ones)."""
        return len(self._shelf)

    def release_buffers(self) -> None:
        """Give the buffers kept between runs back to CuPy's memory pools (numpy's
        on the host backend); the next run allocates its own again."""
        self._shelf.clear()

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
        # The arrays page-locked in place that the run copies from and into are
        # held meanwhile (the page locks' bounds unlock none under a copy).
        holds: list[Any] = []
        try:
            output = _Output(self._engine, data.shape[0], out, holds)
            call = _Call(self, data, _rows_per_chunk(data, self.chunk_bytes), output, serial, holds)
            with self._lock:
                self._slots_in_use += call.count
            try:
                call.shelved = self._shelf.take(call.input_shape, call.count, self.max_in_flight)
                with self._engine.on_device():
                    call.execute()
                # Only after a run that ended well: a failed one leaves nothing behind.
                self._shelf.put(call.shelved + call.finished, self.max_in_flight)
            finally:
                # A failed call lives on in its error's traceback: let its buffers go now.
                call.shelved = call.finished = []
                with self._lock:
                    self._slots_in_use -= call.count
        finally:
            self._engine.release(holds)  # every copy is done (or drained, after a failure)
        assert output.array is not None  # every chunk was copied out
        return output.array

    def capture(self, data: np.ndarray, out: np.ndarray | None = None) -> PipelineGraph:
        """Run once, then capture the whole run as a CUDA graph for these very arrays.

        Most pipelines run the same shapes again and again: ``graph.run()``
        then replays every chunk's copy-in, ``fn`` and copy-out, with the
        events between them, in one launch, so the host pays a fraction of a
        microsecond per chunk. In a graph, kernels on one stream run one
        after another: a copy group's chunks are spread over up to
        ``GRAPH_COMPUTE_LEASES`` (4) compute leases, those idle at capture
        time, so small chunks' kernels run side by side. The graph reads
        ``data`` and writes ``out``
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


#: What a failed run's state holds once its queued work is done (see ``execute``).
_RUN_FAILED = PoolError("this pipeline run failed")

#: Compute leases an eager run takes (a captured one may take more).
_EAGER_COMPUTE_LEASES = 1


class _Leases:
    """The leases a run holds (one lease may fill several roles).

    An eager ``run``'s compute and copy-out leases come once its first copy
    is queued (``computes`` is empty until then), and all go back once its
    last copy-out is queued (``held`` is False from then on). ``run_serial``
    and a capture pass all their leases at once; a capture gives its own
    back when the capture ends.
    """

    __slots__ = ("computes", "copy_in", "copy_out", "held")

    def __init__(
        self,
        copy_in: StreamLease,
        computes: tuple[StreamLease, ...] = (),
        copy_out: StreamLease | None = None,
    ) -> None:
        self.copy_in = copy_in
        self.computes = computes  # a group's chunks take them in turn
        self.copy_out = copy_out
        self.held = True

    def each(self) -> list[StreamLease]:
        """Each lease held, once."""
        if not self.held:
            return []
        taken = (self.copy_in, *self.computes, self.copy_out)
        return [lease for lease in dict.fromkeys(taken) if lease is not None]

    def release(self) -> None:
        """Give back every lease held (a lease's later holder queues behind its work);
        each is given back even if another's release raises (the first error is raised)."""
        leases, self.held = self.each(), False
        failure: BaseException | None = None
        for lease in reversed(leases):
            try:
                lease.release()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


class _Call:
    """One ``run``/``run_serial`` call: its copy groups, slots, output and failure state."""

    __slots__ = (
        "_output_shape",
        "count",
        "data",
        "engine",
        "finished",
        "first_alone",
        "fn",
        "graph_results",
        "group_count",
        "holds",
        "input_shape",
        "output",
        "per_group",
        "pool",
        "serial",
        "shelved",
        "slots",
        "state",
        "step",
        "trace",
    )

    def __init__(
        self,
        pipe: Pipeline,
        data: np.ndarray,
        step: int,
        output: _Output,
        serial: bool,
        holds: list[Any],
    ) -> None:
        self.pool = pipe.pool
        self.holds = holds  # where direct_address() adds its holds on page-locked arrays
        self.fn = pipe.fn
        self.engine = pipe._engine
        self.data = data
        self.step = step
        chunk_count = -(-data.shape[0] // step)
        # Small chunks are copied in groups: each copy has a fixed cost (a few
        # microseconds of host and copy engine) that would dominate small ones.
        chunk_bytes = step * data.itemsize * math.prod(data.shape[1:])
        wanted = 1 if serial else -(-pipe.min_copy_bytes // max(1, chunk_bytes))
        self.per_group = max(1, min(wanted, chunk_count))
        # Results are gathered into a buffer of the output's dtype, which the
        # first chunk's result decides: without an output yet, that chunk goes alone.
        self.first_alone = self.per_group > 1 and output.array is None
        alone = int(self.first_alone)
        self.group_count = alone + -(-(chunk_count - alone) // self.per_group)
        self.output = output
        self.serial = serial
        self.count = 1 if serial else min(pipe.max_in_flight, self.group_count)
        self.slots: list[_Slot] = []
        # What a group's buffers are made for (its rows: of input, and of output).
        self.input_shape = InputShape(self.per_group * step, step, data.shape[1:], data.dtype)
        self.shelved: list[SlotBuffers] = []  # buffers of an earlier run, for new slots
        self.finished: list[SlotBuffers] = []  # this run's, once their groups are home
        self._output_shape: OutputShape | None = None  # see output_shape()
        self.state = RunState()
        self.trace = pipe.pool._trace  # a traced pool gets a span per stage of each group
        # While captured as a graph (capture_graph), the run must never wait
        # on the host: a slot is reused after a device-side wait instead, and
        # every result is kept, since the graph writes it at every replay.
        self.graph_results: list[Any] | None = None

    def output_shape(self) -> OutputShape | None:
        """The output side of the run's groups, once the output is known (made once)."""
        if self._output_shape is None and (out := self.output.array) is not None:
            self._output_shape = OutputShape(self.input_shape.rows, out.shape[1:], out.dtype)
        return self._output_shape

    def execute(self) -> None:
        pool = self.pool
        if self.serial:
            lease = pool.acquire_compute()
            leases = _Leases(lease, (lease,), lease)
        else:
            leases = _Leases(pool.acquire_comm())  # the rest once the first copy is queued
        try:
            self._loop(leases)
        except BaseException as exc:
            self.state.fail(exc)  # queued host-backend stages skip their work
            self._drain(leases)  # no buffer is freed under a copy or a kernel
            # Nothing is queued now. The run stays failed without holding exc,
            # whose traceback holds this call (and the pipeline, and its shelf).
            self.state.error = _RUN_FAILED
            raise
        finally:
            for slot in self.slots:
                slot.free(pool.events)
            leases.release()

    def _drain(self, leases: _Leases) -> None:
        """After a failure: wait until no queued copy or kernel uses the run's buffers."""
        for lease in leases.each():
            with contextlib.suppress(Exception):
                lease.synchronize()
        if not leases.held:  # given back: every stage was queued, each group's copy-out last
            for slot in self.slots:
                if slot.busy:
                    with contextlib.suppress(Exception):
                        self.engine.synchronize(slot.ev_out)

    def capture_graph(self) -> tuple[CapturedGraph, list[Any]]:
        """Capture the run as a graph, without running it: the graph and what it writes.

        The copy-in lease is the capture's origin; the compute and copy-out
        leases are acquired inside the capture, so they join it, and released
        inside it, so they join back. The capture takes up to
        ``GRAPH_COMPUTE_LEASES`` compute leases in all (the one it needs, and
        others while they are idle), and gives each a group's chunks in turn:
        in a graph, kernels on one stream run one after another, kernels on
        several side by side. Events and device buffers are taken before the
        capture begins (none may be created during it).
        """
        events = self.pool.events
        self.graph_results = []
        most = min(GRAPH_COMPUTE_LEASES, self.pool._compute.capacity, self.per_group)
        try:
            for _ in range(self.count):
                self.slots.append(_Slot())
                self.slots[-1].take_events(events, most)
                self._input_buffer(self.slots[-1])
                self._output_buffers(self.slots[-1])
            graph = self._capture_loop(most)
            kept = [buffer for slot in self.slots for buffer in (slot.x, slot.gathered)]
        finally:
            for slot in self.slots:  # also when a buffer or the capture failed half-way
                slot.free(events)
        return graph, [buffer for buffer in kept if buffer is not None] + self.graph_results

    def _capture_loop(self, most: int) -> CapturedGraph:
        """The capture itself, on slots ready: its leases join it and join back."""
        pool = self.pool
        copy_in = pool.acquire_comm()
        joined: list[StreamLease] = []
        try:
            with pool.capture(copy_in) as graph:
                joined.append(pool.acquire_compute())
                while len(joined) < most and pool._compute.idle:  # a hint, as below
                    try:
                        joined.append(pool.acquire_compute(blocking=False))
                    except PoolExhaustedError:
                        break
                computes = tuple(joined)
                copy_out = _copy_out_lease(pool, copy_in)
                if copy_out is not copy_in:
                    joined.append(copy_out)
                self._loop(_Leases(copy_in, computes, copy_out))
                for lease in reversed(joined):
                    lease.release()  # joins back: the origin waits for its work
        finally:
            for lease in joined:
                if not lease.released:
                    # A failure left it joined: the capture's end made it a
                    # plain lease again, which goes back now.
                    with contextlib.suppress(Exception):
                        lease.release()
            copy_in.release()
        assert graph is not None  # the origin is a lease: the capture began here
        return graph

    def _take_rest(self, leases: _Leases) -> None:
        """Take the compute and copy-out leases, held until the last copy-out is
        queued (per chunk, leasing would cost more than the copies). Called once
        the first copy is queued: the device copies while the host takes them."""
        leases.copy_out = _copy_out_lease(self.pool, leases.copy_in)
        leases.computes = tuple(self.pool.acquire_compute() for _ in range(_EAGER_COMPUTE_LEASES))

    def _input_buffer(self, slot: _Slot) -> None:
        """Give ``slot`` its device input buffer (the one its copy-in needs)."""
        if slot.x is None:
            data = self.data
            slot.x = self.engine.device_empty((self.input_shape.rows, *data.shape[1:]), data.dtype)

    def _output_buffers(self, slot: _Slot) -> None:
        """Give ``slot`` the buffer a group's results are gathered into, once the
        output is known (an eager run: after the group's copy-in is queued)."""
        out = self.output.array
        shape = self.output_shape()
        if shape is not None and slot.output_shape is not shape:
            # Made for another output (an earlier run's), or before this one was known.
            slot.fit_output(shape)
        if slot.gathered is None and self.per_group > 1 and out is not None:
            slot.gathered = self.engine.device_empty(
                (self.input_shape.rows, *out.shape[1:]), out.dtype
            )

    def _groups(self) -> Iterator[list[tuple[int, int]]]:
        """Each copy group's chunks, as (start, stop) rows, in order.

        Made one group at a time: a run of many small chunks would otherwise
        build all of them before its first copy.
        """
        rows, step = self.data.shape[0], self.step
        start = 0
        if self.first_alone:
            yield [(0, min(rows, step))]
            start = step
        span = self.per_group * step
        for first in range(start, rows, span):
            yield [
                (row, min(rows, row + step)) for row in range(first, min(rows, first + span), step)
            ]

    def _loop(self, leases: _Leases) -> None:
        engine, data = self.engine, self.data
        rows_per_group = self.input_shape.rows
        address = engine.direct_address(data, self.holds)
        direct_in = address is not None
        # Addresses by arithmetic: direct arrays are C-contiguous.
        base, row_bytes = (address, data.strides[0]) if address is not None else (0, 0)
        for index, group in enumerate(self._groups()):
            start, stop = group[0][0], group[-1][1]
            if self.per_group > 1 and self.output.array is None and index:
                # The first chunk's result allocates the output (on the host
                # backend, on a worker thread): later groups gather into its dtype.
                for slot in self.slots:
                    self._retire(slot)
            if len(self.slots) < self.count:
                self.slots.append(_Slot(self.shelved.pop() if self.shelved else None))
            slot = self.slots[index % self.count]
            self._retire(slot, leases.copy_in)  # bounds the groups in flight
            src = data[start:stop]
            src_ptr = base + start * row_bytes
            if not direct_in:
                if slot.stage_in is None:
                    slot.stage_in = engine.host_empty((rows_per_group, *data.shape[1:]), data.dtype)
                    slot.stage_in_ptr = slot.stage_in.ctypes.data
                src, src_ptr = slot.stage_in[: stop - start], slot.stage_in_ptr
                host_copy(src, data[start:stop])
            self._input_buffer(slot)
            self._stages(slot, group, src, src_ptr, leases)
            if self.serial:
                self._retire(slot)  # as a blocking .get() would
        if self.graph_results is not None:
            for slot in self.slots:
                self._retire(slot)  # the capture keeps the slots' buffers
            return
        # Every stage is queued: the leases go back while the device works on
        # the last groups (a later holder's work queues behind them), and each
        # slot's buffers go to the shelf as soon as its group is home, oldest
        # first, so that after the last copy-out little is left to do.
        leases.release()
        last = self.group_count
        for slot in [self.slots[i % self.count] for i in range(last - len(self.slots), last)]:
            self._retire(slot)
            output_shape = self.output_shape()
            assert output_shape is not None  # the first group, home first, made the output
            self.finished.append(slot.shelve(self.input_shape, output_shape))
            # Freed while still listed: an interrupt in between leaves it to
            # execute()'s cleanup, which frees every listed slot (again: a no-op).
            slot.free(self.pool.events)
            self.slots.remove(slot)

    def _chunk_view(self, slot: _Slot, index: int, first: int, last: int) -> Any:
        """Rows ``first:last`` of the slot's input buffer: a group's ``index``-th chunk."""
        if last - first != self.step:
            return slot.x[first:last]  # the run's last, shorter chunk
        views = slot.chunks
        while len(views) <= index:
            at = len(views) * self.step
            views.append(slot.x[at : at + self.step])
        return views[index]

    def _destination(self, slot: _Slot, start: int, stop: int) -> Destination:
        output = self.output

        def destination(y: Any) -> tuple[np.ndarray, int]:
            view = output.view(y, start, stop)
            if output.direct:
                assert output.array is not None
                return view, output.ptr + start * output.array.strides[0]
            if slot.stage_out is None:
                slot.stage_out = self.engine.host_empty(
                    (self.input_shape.rows, *view.shape[1:]), np.dtype(view.dtype)
                )
                slot.stage_out_ptr = slot.stage_out.ctypes.data
            staged = slot.stage_out[: stop - start]
            slot.copy_back = (view, staged)
            return staged, slot.stage_out_ptr

        return destination

    def _retire(self, slot: _Slot, copy_in: StreamLease | None = None) -> None:
        """Wait until the slot's group is back on the host, then free the slot.

        In a capture, ``copy_in`` waits on the device instead (None at the end
        of the run: the capture's join-back orders what is left).
        """
        if slot.busy and self.graph_results is not None:
            if copy_in is not None:
                self.engine.wait(copy_in, slot.ev_out)
            self.graph_results += slot.results
            slot.results = []
            slot.busy = False
        elif slot.busy:
            self.engine.synchronize(slot.ev_out)
            if slot.copy_back is not None:
                host_copy(*slot.copy_back)
            slot.copy_back = None
            slot.results = []  # the device may reuse the results' memory now
            slot.busy = False
        self.state.check()

    def _stages(
        self,
        slot: _Slot,
        group: list[tuple[int, int]],
        src: np.ndarray,
        src_ptr: int,
        leases: _Leases,
    ) -> None:
        copy_in = leases.copy_in
        engine, state, trace, fn, output = self.engine, self.state, self.trace, self.fn, self.output
        start, stop = group[0][0], group[-1][1]
        x = slot.x if stop - start == slot.x.shape[0] else slot.x[: stop - start]
        span = None if trace is None else trace._stage_begin(copy_in)
        engine.copy_in(copy_in, x, src, src_ptr, state)
        if span is not None and trace is not None:
            trace._stage_end(span, "copy-in")
        if not slot.events:
            # An event per compute lease: an eager run takes them after its first copy.
            slot.take_events(self.pool.events, len(leases.computes) or _EAGER_COMPUTE_LEASES)
        engine.record(slot.ev_in, copy_in)
        self._output_buffers(slot)
        slot.busy = True
        if not leases.computes:
            self._take_rest(leases)
        copy_out = leases.copy_out
        assert copy_out is not None  # taken with the computes
        computes = leases.computes[: len(group)]
        for compute in computes:
            if compute is not copy_in:
                engine.wait(compute, slot.ev_in)
        gathered = None if len(group) == 1 else slot.gathered
        try:
            for lane, compute in enumerate(computes):
                # This lease's chunks of the group (every len(computes)-th).
                indices = range(lane, len(group), len(computes))
                if gathered is None:
                    chunks = [x]
                else:
                    chunks = [self._chunk_view(slot, i, *_rows(group[i], start)) for i in indices]
                results = [Pending() for _ in chunks]
                slot.results += results  # held before fn runs: it may fail half-way
                span = None if trace is None else trace._stage_begin(compute)
                engine.compute(compute, fn, chunks, results, state)
                if gathered is not None:
                    lane_chunks = [group[i] for i in indices]
                    engine.gather(
                        compute, results, gathered, lane_chunks, start, output.check, state
                    )
                if span is not None and trace is not None:
                    trace._stage_end(span, "compute")
        finally:
            # Also after a failure: fn may have queued work that reads x.
            for compute, event in zip(computes, slot.ev_comp, strict=False):
                engine.record(event, compute)
        for compute, event in zip(computes, slot.ev_comp, strict=False):
            if copy_out is not compute:
                engine.wait(copy_out, event)
        span = None if trace is None else trace._stage_begin(copy_out)
        if gathered is None:
            result = slot.results[0]
        else:
            rows = stop - start  # sliced only when the group is the run's shorter last
            result = Pending(gathered if rows == len(gathered) else gathered[:rows])
        engine.copy_out(copy_out, result, self._destination(slot, start, stop), state)
        if span is not None and trace is not None:
            trace._stage_end(span, "copy-out")
        engine.record(slot.ev_out, copy_out)


def _rows_per_chunk(data: np.ndarray, chunk_bytes: int) -> int:
    """Whole rows of ``data`` in ``chunk_bytes``, at least one."""
    row_bytes = data.itemsize * math.prod(data.shape[1:])
    return max(1, chunk_bytes // max(1, row_bytes))


def _rows(chunk: tuple[int, int], start: int) -> tuple[int, int]:
    """A chunk's rows in its group's buffer, which starts at row ``start``."""
    return chunk[0] - start, chunk[1] - start


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
    _lock: threading.Lock  # guards _pipe, _graph, _kept, _memory; serializes replays
    _graph: CapturedGraph | None  # None once closed
    _kept: list[Any]  # the device buffers the graph reads and writes
    _memory: Any  # the private CuPy memory pool fn allocated from during the capture
    # Holds on data and out where they are page-locked in place: taken by the
    # capture, given back (the list emptied) by the close() that frees the
    # graph, or by the finalizer of a graph never closed.
    _holds: list[Any]
    _state: RunState  # the run's, which the host backend's recorded stages report into

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
        self._holds = []
        engine = pipe._engine
        for argument, array in (("data", data), ("out", out)):
            # The graph copies straight from and into host memory. (A pageable
            # array is page-locked the second time the page locks see it: the
            # first run was the first time, unless it was staged.)
            if not (engine.make_direct(array) or engine.make_direct(array)):
                raise ValueError(
                    f"{argument} is pageable memory that could not be page-locked; a graph "
                    "copies straight from host memory: pass an array from pipe.empty_host()"
                )
        # The graph copies from and into data and out at every replay: they are
        # held for its life (the page locks' bounds never unlock them under
        # it), and given back by close(), or when the graph is collected.
        weakref.finalize(self, engine.release, self._holds)
        try:
            output = _Output(engine, data.shape[0], out, self._holds)
            call = _Call(
                pipe, data, _rows_per_chunk(data, pipe.chunk_bytes), output, False, self._holds
            )
            # The graph keeps buffers of its own for its life: those the first
            # run left on the shelf would only double them.
            pipe.release_buffers()
            self._state = call.state
            with engine.on_device(), engine.graph_memory() as self._memory:
                self._graph, self._kept = call.capture_graph()
        except BaseException as exc:
            engine.release(self._holds)  # a graph that failed holds nothing
            if isinstance(exc, (PoolError, MemoryError)) or not isinstance(exc, Exception):
                raise  # the pool's state, the device's memory, an interrupt: not fn
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
            Exception: On the host backend, whatever ``fn`` raised during the
                replay (the replay's later stages are skipped).
        """
        for argument, given, captured in (("data", data, self._data), ("out", out, self._out)):
            if given is not None and not _same_array(given, captured):
                raise ValueError(
                    f"{argument} is not the array this graph was captured for ({_describe(given)}"
                    f" vs {_describe(captured)}); a graph replays fixed addresses: capture "
                    f"again with pipe.capture(data, out)"
                )
        with self._lock:
            pipe, graph = self._pipe, self._graph
            if pipe is None or graph is None:
                raise PoolError("this PipelineGraph was closed; capture again with pipe.capture()")
            self._state.error = None  # a failed replay's error was raised; this one starts clean
            with pipe.pool.acquire_compute() as lease:
                graph.launch(lease)
                lease.synchronize()
            self._state.check()  # the host backend's recorded stages run fn again
        return self._out

    def close(self) -> None:
        """Free the graph, its device buffers and ``fn``'s results (idempotent)."""
        with self._lock:
            pipe, graph, memory = self._pipe, self._graph, self._memory
            self._pipe = self._graph = self._memory = None
            self._kept = []
        try:
            if graph is not None:
                graph.close()
            if memory is not None:
                memory.free_all_blocks()  # a CuPy memory pool of the graph's own
        finally:
            if pipe is not None:
                # data and out may be unlocked again. (The list is emptied in
                # place: the finalizer that would give them back has it too.)
                pipe._engine.release(self._holds)

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
