"""The overlapped pipeline against its stage bound, raw CuPy and one stream.

The stage bound is the slowest of: every chunk copied in alone, every chunk
copied out alone, both directions at once, and the compute alone on
device-resident chunks. No schedule of the three stages can beat it, so
``bound / time`` is how much of the machine a pipeline uses.

On a GPU every figure is measured. On the host backend every figure is
modelled: the same runs go through the same ``Pipeline`` on host streams with
small arrays (so the result is still checked), and a device model times the
stages each run queues as an H100's copy engines and SMs would run them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import CudaStreamPool
from .._pipeline_engines import Pending, RunState
from .._trace import Trace
from ..pipeline import Pipeline
from .common import Result, interleaved_medians, median_ms
from .model import H100, Interval
from .model_engine import ModelEngine
from .timeline import Bar, Panel, lane_labels
from .workloads import transform

__all__ = ["PipelineFigures", "PipelineSetup", "measure_pipeline", "pipeline_results"]


@dataclass(frozen=True)
class PipelineSetup:
    """What the pipeline measurement moves and computes."""

    chunks: int = 16
    chunk_mib: int = 64
    iterations: int = 4  # multiply-adds per element in the compute
    # Modelled kernel time per chunk on the host backend (0: the modelled
    # GPU's time for a chunk of this size).
    host_kernel_ms: float = 0.0
    repeats: int = 7  # measured runs per figure (modelled figures need one)
    max_in_flight: int = 4

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_mib << 20


@dataclass
class PipelineFigures:
    """Times in ms of one pipeline measurement: medians, or modelled (``model``).

    ``traces`` holds the traced GPU runs; ``panels`` the modelled runs, drawn
    from the very schedules whose times the figures are.
    """

    backend: str
    setup: PipelineSetup
    h2d_ms: float
    d2h_ms: float
    both_ms: float
    compute_ms: float
    one_stream_ms: float
    pipeline_ms: float
    raw_ms: float | None = None
    pageable_ms: float | None = None
    identical: bool = False
    traces: list[tuple[str, Trace]] = field(default_factory=list)
    model: str | None = None  # the GPU the times are modelled on; None: measured
    panels: list[Panel] = field(default_factory=list)

    @property
    def bound_ms(self) -> float:
        return max(self.h2d_ms, self.d2h_ms, self.both_ms, self.compute_ms)

    def efficiency(self, ms: float) -> float:
        return self.bound_ms / ms


def _copy_ring(pipe: Pipeline, count: int, step: int) -> list[Any]:
    return [pipe._engine.device_empty((step,), np.dtype(np.float32)) for _ in range(count)]


def _stage_runs(
    pool: CudaStreamPool, pipe: Pipeline, data: np.ndarray, out: np.ndarray, chunks: int
) -> tuple[dict[str, Callable[[], object]], RunState]:
    """Runs for H2D alone, D2H alone, both directions at once, compute alone."""
    engine, state = pipe._engine, RunState()
    step = len(data) // chunks
    ring = _copy_ring(pipe, 2, step)
    inputs = [data[i * step : (i + 1) * step] for i in range(chunks)]
    outputs = [out[i * step : (i + 1) * step] for i in range(chunks)]

    def target(view: np.ndarray) -> Callable[[Any], tuple[np.ndarray, int]]:
        where = (view, view.ctypes.data)
        return lambda _y: where

    pointers = [src.ctypes.data for src in inputs]
    targets = [target(dst) for dst in outputs]

    def copies_in(lease: Any) -> None:
        for i, src in enumerate(inputs):
            engine.copy_in(lease, ring[i % 2], src, pointers[i], state)

    def copies_out(lease: Any) -> None:
        for i, where in enumerate(targets):
            engine.copy_out(lease, Pending(ring[i % 2]), where, state)

    def alone(queue: Callable[[Any], None]) -> Callable[[], None]:
        def run() -> None:
            with pool.acquire_comm() as lease:
                queue(lease)
                lease.synchronize()

        return run

    def both() -> None:
        with pool.acquire_comm() as first, pool.acquire_comm() as second:
            copies_in(first)
            copies_out(second)
            first.synchronize()
            second.synchronize()

    def compute() -> None:
        with pool.acquire_compute() as lease:
            for i in range(chunks):
                # Each result is dropped at once: its memory is reused in
                # stream order by the next chunk's kernel.
                engine.compute(lease, pipe.fn, [ring[i % 2]], [Pending()], state)
            lease.synchronize()

    runs: dict[str, Callable[[], object]] = {
        "h2d": alone(copies_in),
        "d2h": alone(copies_out),
        "both": both,
        "compute": compute,
    }
    return runs, state


def _raw_cupy_three_streams(
    fn: Callable[[Any], Any], data: np.ndarray, out: np.ndarray, step: int, depth: int
) -> Callable[[], None]:
    """The pipeline as one writes it by hand with CuPy: three streams, events."""
    import cupy

    s_in, s_comp, s_out = (cupy.cuda.Stream(non_blocking=True) for _ in range(3))
    ev = [[cupy.cuda.Event(disable_timing=True) for _ in range(3)] for _ in range(depth)]
    xs = [cupy.empty(step, cupy.float32) for _ in range(depth)]
    chunks = len(data) // step

    def run() -> None:
        results: list[Any] = [None] * depth
        for i in range(chunks):
            k = i % depth
            ev_in, ev_comp, ev_out = ev[k]
            if i >= depth:
                ev_out.synchronize()
                results[k] = None
            xs[k].set(data[i * step : (i + 1) * step], stream=s_in)
            ev_in.record(s_in)
            s_comp.wait_event(ev_in)
            with s_comp:
                results[k] = fn(xs[k])
            ev_comp.record(s_comp)
            s_out.wait_event(ev_comp)
            results[k].get(stream=s_out, out=out[i * step : (i + 1) * step], blocking=False)
            ev_out.record(s_out)
        s_out.synchronize()

    return run


def measure_pipeline(
    backend: str, setup: PipelineSetup, trace: bool = False, pool: CudaStreamPool | None = None
) -> PipelineFigures:
    """Measure the stage bound, one stream, the pipeline (and raw CuPy on a GPU).

    On the host backend the figures are modelled (``_model_pipeline``) and the
    runs they time are always drawn (``figures.panels``). On a GPU, ``trace``
    traces one more run of one stream and of the pipeline (``figures.traces``).
    """
    if backend == "host":
        return _model_pipeline(setup, pool)
    own_pool = pool is None
    pool = pool or CudaStreamPool(backend=backend)
    try:
        fn = transform(backend, setup.iterations)
        pipe = Pipeline(pool, fn, chunk_bytes=setup.chunk_bytes, max_in_flight=setup.max_in_flight)
        rows = setup.chunks * (setup.chunk_bytes // 4)
        data = pipe.empty_host((rows,), np.float32)
        data[:] = np.linspace(-1.0, 1.0, rows, dtype=np.float32)
        out = pipe.empty_host((rows,), np.float32)
        out[:] = 0  # touch every page before timing
        reference = pipe.empty_host((rows,), np.float32)
        reference[:] = 0

        runs, state = _stage_runs(pool, pipe, data, out, setup.chunks)
        runs["one_stream"] = functools.partial(pipe.run_serial, data, reference)
        runs["pipeline"] = functools.partial(pipe.run, data, out)
        raw: Callable[[], None] | None = None
        if backend == "cupy":
            # Into the same page-locked buffer as the pipeline and the bound:
            # where a buffer sits (which NUMA node) changes the copy speed.
            raw = _raw_cupy_three_streams(
                fn, data, out, setup.chunk_bytes // 4, depth=setup.max_in_flight
            )
            runs["raw"] = raw
        # Round-robin, so a drift of the machine (clocks, PCIe) hits every
        # figure alike instead of biasing the ones measured last.
        ms = interleaved_medians(runs, setup.repeats)
        state.check()
        identical = True
        for run in (runs["pipeline"], raw):
            if run is not None:
                out[:] = 0
                run()
                identical = identical and bool(np.array_equal(out, reference))
        figures = PipelineFigures(
            backend, setup, ms["h2d"], ms["d2h"], ms["both"], ms["compute"],
            ms["one_stream"], ms["pipeline"], raw_ms=ms.get("raw"), identical=identical,
        )  # fmt: skip
        if backend == "cupy":
            pageable_in, pageable_out = np.array(data), np.zeros_like(np.asarray(out))
            figures.pageable_ms = median_ms(
                functools.partial(pipe.run, pageable_in, pageable_out), max(1, setup.repeats // 3)
            )
        if trace:
            with pool.trace() as serial_trace:
                pipe.run_serial(data, reference)
            with pool.trace() as pool_trace:
                pipe.run(data, out)
            # Named, not timed: a title quotes the run it draws.
            figures.traces = [("one stream", serial_trace), ("pipeline on the pool", pool_trace)]
        return figures
    finally:
        if own_pool:
            pool.close()


#: Bytes per chunk the host really moves when the device is modelled: enough
#: to check the result, too few to load the CPU.
_MODELLED_CHUNK_BYTES = 64 << 10


def _model_pipeline(setup: PipelineSetup, pool: CudaStreamPool | None) -> PipelineFigures:
    """The measurement's runs on host streams, each timed once on the device model.

    The model is deterministic, so one run of each gives its figure, and the
    runs of one stream and of the pipeline are the ones drawn.
    """
    own_pool = pool is None
    pool = pool or CudaStreamPool(backend="host")
    try:
        pipe = Pipeline(
            pool,
            transform("host", setup.iterations),
            chunk_bytes=_MODELLED_CHUNK_BYTES,
            max_in_flight=setup.max_in_flight,
            min_copy_bytes=0,  # its small chunks stand for large ones, never grouped
        )
        engine = ModelEngine(
            pool._backend,
            mib_per_byte=setup.chunk_mib / _MODELLED_CHUNK_BYTES,
            kernel_ms=setup.host_kernel_ms or None,
        )
        pipe._engine = engine  # before the runs capture it
        rows = setup.chunks * (_MODELLED_CHUNK_BYTES // 4)
        data = np.linspace(-1.0, 1.0, rows, dtype=np.float32)
        out, reference = np.zeros_like(data), np.zeros_like(data)
        runs, state = _stage_runs(pool, pipe, data, out, setup.chunks)
        # The pipeline last: its result stays in out, to compare with one stream's.
        runs["one_stream"] = functools.partial(pipe.run_serial, data, reference)
        runs["pipeline"] = functools.partial(pipe.run, data, out)
        timed = {name: engine.timed(run) for name, run in runs.items()}
        state.check()
        ms = {name: figure for name, (figure, _) in timed.items()}
        labels = lane_labels(pool._streams)
        serial, piped = ms["one_stream"], ms["pipeline"]
        return PipelineFigures(
            "host", setup, ms["h2d"], ms["d2h"], ms["both"], ms["compute"], serial, piped,
            identical=bool(np.array_equal(out, reference)),
            model=H100.name,
            panels=[
                _panel(f"one stream: {serial:.1f} ms", timed["one_stream"][1], labels),
                _panel(
                    f"pipeline on the pool: {piped:.1f} ms ({serial / piped:.2f}x faster)",
                    timed["pipeline"][1],
                    labels,
                ),
            ],
        )  # fmt: skip
    finally:
        if own_pool:
            pool.close()


def _panel(title: str, intervals: list[Interval], labels: dict[int, str]) -> Panel:
    """One modelled run: a row per stream it used, a bar per stage."""
    streams = sorted({i.stream for i in intervals})
    bars = tuple(Bar(labels[i.stream], i.stage, i.start_ms, i.end_ms) for i in intervals)
    return Panel(title, tuple(labels[s] for s in streams), bars)


def _compute_note(figures: PipelineFigures) -> str:
    setup = figures.setup
    if figures.model is None:
        return f"{setup.iterations} multiply-adds per element"
    if setup.host_kernel_ms:
        return f"modelled: a {setup.host_kernel_ms:g} ms kernel per chunk"
    return f"modelled: the transform kernel's measured time on an {figures.model}, per MiB"


def pipeline_results(figures: PipelineFigures) -> list[Result]:
    """The figures as benchmark results, with efficiency against the bound."""
    f, setup = figures, figures.setup
    where = f"{setup.chunks} chunks x {setup.chunk_mib} MiB, {f.backend} backend"
    modelled = ""
    if f.model is not None:
        where += f", modelled on an {f.model} (not measured)"
        modelled = ", modelled"
    results = [
        Result("pipeline", "H2D alone", f.h2d_ms, "ms", where),
        Result("pipeline", "D2H alone", f.d2h_ms, "ms", where),
        Result("pipeline", "H2D + D2H at once", f.both_ms, "ms", where),
        Result("pipeline", "compute alone", f.compute_ms, "ms", _compute_note(f)),
        Result("pipeline", "stage bound", f.bound_ms, "ms", f"slowest of the four above{modelled}"),
    ]
    runs = [
        ("one stream (Pipeline.run_serial)", f.one_stream_ms),
        ("hand-written raw CuPy, 3 streams", f.raw_ms),
        ("Pipeline.run on the pool", f.pipeline_ms),
        ("Pipeline.run, pageable arrays", f.pageable_ms),
    ]
    for name, ms in runs:
        if ms is None:
            results.append(Result("pipeline", name, None, "ms", "needs a GPU"))
            continue
        results.append(
            Result(
                "pipeline",
                name,
                ms,
                "ms",
                f"{f.efficiency(ms):.3f} of the bound{modelled}",
                {"efficiency": f.efficiency(ms)},
            )
        )
    results.append(
        Result(
            "pipeline",
            "speedup of the pool over one stream",
            f.one_stream_ms / f.pipeline_ms,
            "x",
            f"results identical to one stream (and raw CuPy): {f.identical}"
            if f.model is None
            else f"results identical to one stream: {f.identical} (host arrays), modelled",
            {"identical": f.identical},
        )
    )
    return results
