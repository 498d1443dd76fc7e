"""The demo and bench without a GPU: modelled, the pool ahead every run, a timeline that agrees."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import cast

import pytest

from cupystreams._bench.demo import demo_setup, traced_panels
from cupystreams._bench.memory import memory_results, model_memory
from cupystreams._bench.model import H100
from cupystreams._bench.pipeline_bench import (
    PipelineFigures,
    PipelineSetup,
    measure_pipeline,
    pipeline_results,
)
from cupystreams._bench.priority import (
    BLOCK_US,
    PriorityFigures,
    measure_priority,
    priority_results,
)
from cupystreams._bench.timeline import Bar, Panel
from cupystreams._trace import Span, Trace, TraceRow
from cupystreams.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
STAGES = ("copy-in", "compute", "copy-out")
SETUPS = {
    "demo": demo_setup("host", quick=False),
    "demo --quick": demo_setup("host", quick=True),
}


def overlap(a: Bar, b: Bar) -> bool:
    return a.start_ms < b.end_ms and b.start_ms < a.end_ms


def figure_in(title: str) -> float:
    """The first "<number> ms" of a title."""
    match = re.search(r"(\d+\.\d+) ms", title)
    assert match is not None, title
    return float(match.group(1))


@pytest.fixture(scope="module", params=list(SETUPS))
def pipe(request: pytest.FixtureRequest) -> PipelineFigures:
    return measure_pipeline("host", SETUPS[request.param])


@pytest.fixture(scope="module")
def prio() -> PriorityFigures:
    return measure_priority("host", repeats=3)


# -- the pool's effect, every run ---------------------------------------------


def test_the_pipeline_on_the_pool_beats_one_stream(pipe: PipelineFigures) -> None:
    assert pipe.model == H100.name
    assert pipe.one_stream_ms / pipe.pipeline_ms >= 1.5
    assert pipe.efficiency(pipe.pipeline_ms) >= 0.9  # near the stage bound, as on the H100
    assert pipe.identical  # the pool's pipeline computed what one stream did


def test_one_stream_is_its_stages_one_after_the_other(pipe: PipelineFigures) -> None:
    serial = pipe.h2d_ms + pipe.compute_ms + pipe.d2h_ms
    assert pipe.one_stream_ms == pytest.approx(serial, rel=0.01)
    assert pipe.both_ms > max(pipe.h2d_ms, pipe.d2h_ms)  # the link is shared


def test_a_kernel_bound_pipeline_is_held_to_its_kernels() -> None:
    setup = PipelineSetup(chunks=8, chunk_mib=8, iterations=0, host_kernel_ms=1.0)
    figures = measure_pipeline("host", setup)
    assert figures.compute_ms == pytest.approx(8.0, abs=0.01)
    assert figures.pipeline_ms < figures.one_stream_ms
    assert figures.efficiency(figures.pipeline_ms) >= 0.9


def test_the_urgent_request_is_much_sooner_on_the_high_priority_lease(
    prio: PriorityFigures,
) -> None:
    assert prio.model == H100.name
    assert prio.high_ms <= prio.normal_ms / 5
    # High priority waits for a running block at most, never for a kernel.
    assert prio.high_ms <= BLOCK_US / 1e3 * 1.05 + 0.01
    assert 25 < prio.flood_ms < 35  # an H100's flood lasts 29 ms


def test_pooled_streams_hold_less_memory() -> None:
    memory = model_memory()
    assert memory.modelled
    assert (memory.fresh_mib, memory.pooled_mib) == (256, 16)  # one 4 MiB block per stream


def test_the_figures_are_the_same_every_run() -> None:
    setup = SETUPS["demo --quick"]
    first, second = measure_pipeline("host", setup), measure_pipeline("host", setup)
    assert (first.one_stream_ms, first.pipeline_ms) == (second.one_stream_ms, second.pipeline_ms)
    assert first.panels == second.panels
    a, b = measure_priority("host", 1), measure_priority("host", 1)
    assert (a.normal_ms, a.high_ms, a.panels) == (b.normal_ms, b.high_ms, b.panels)


def test_bench_rows_say_they_are_modelled(pipe: PipelineFigures, prio: PriorityFigures) -> None:
    rows = pipeline_results(pipe) + priority_results(prio) + memory_results(model_memory())
    valued = [r for r in rows if r.value is not None]
    assert len(valued) == 12 and all("modelled" in r.note for r in valued)
    assert {r.name for r in rows if r.value is None} == {
        "hand-written raw CuPy, 3 streams",
        "Pipeline.run, pageable arrays",
    }
    speedup = next(r for r in rows if r.name == "speedup of the pool over one stream")
    assert speedup.value is not None and speedup.value >= 1.5


# -- the schedule drawn obeys the device's rules ------------------------------


def test_the_pipeline_drawn_keeps_chunk_and_stream_order_and_one_copy_per_engine(
    pipe: PipelineFigures,
) -> None:
    serial, piped = pipe.panels
    assert len(serial.lanes) == 1 and len(piped.lanes) == 3
    for panel in (serial, piped):
        for lane in panel.lanes:
            for a, b in itertools.pairwise(panel.lane(lane)):
                assert b.start_ms >= a.end_ms  # a stream never overlaps itself
        for stage in ("copy-in", "copy-out"):
            copies = _in_order(panel, stage)
            assert len(copies) == pipe.setup.chunks
            for a, b in itertools.combinations(copies, 2):
                assert not overlap(a, b)  # one copy engine each way
        # Chunk by chunk (the n-th bar of each stage): in, then compute, then out.
        chunks = zip(*(_in_order(panel, stage) for stage in STAGES), strict=True)
        for copy_in, compute, copy_out in chunks:
            assert copy_in.end_ms <= compute.start_ms and compute.end_ms <= copy_out.start_ms
    ins, _, outs = (_in_order(piped, stage) for stage in STAGES)
    assert any(overlap(a, b) for a in ins for b in outs)  # the pool overlaps both ways


def _in_order(panel: Panel, stage: str) -> list[Bar]:
    return sorted((bar for bar in panel.bars if bar.stage == stage), key=lambda bar: bar.start_ms)


# -- the timeline agrees with the table -----------------------------------------


def test_pipeline_titles_quote_the_runs_drawn(pipe: PipelineFigures) -> None:
    serial, piped = pipe.panels
    for panel, figure in ((serial, pipe.one_stream_ms), (piped, pipe.pipeline_ms)):
        assert panel.end_ms == pytest.approx(figure, abs=1e-9)
        assert figure_in(panel.title) == round(figure, 1)
    assert {bar.stage for bar in serial.bars} == {"copy-in", "compute", "copy-out"}


def test_priority_titles_quote_the_request_drawn(prio: PriorityFigures) -> None:
    normal, high = prio.panels
    for panel, figure in ((normal, prio.normal_ms), (high, prio.high_ms)):
        request = [bar for bar in panel.bars if bar.stage.startswith("urgent")]
        assert len({bar.lane for bar in request}) == 1  # queued, then run, on its lease
        assert sum(bar.duration_ms for bar in request) == pytest.approx(figure, abs=1e-9)
        assert figure_in(panel.title) == round(figure, 2)
        # Each panel spans its own flood, not a shared axis.
        assert panel.end_ms == pytest.approx(prio.flood_ms, rel=0.01)
    assert "high_priority" in high.lanes[-1]


# -- the demo itself -------------------------------------------------------------


def test_the_demo_says_first_that_it_is_modelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a table row per line
    png = tmp_path / "timeline.png"
    assert main(["demo", "--backend", "host", "--quick", "--output", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "modelled" in lines[0] and "not measured" in lines[0]
    table = "\n".join(lines)
    assert "simulated" not in table  # nothing later says otherwise
    for scene in ("pipeline", "urgent request", "memory"):
        row = next(line for line in lines if scene in line)
        assert "modelled" in row, row
    assert "differs" not in table
    assert png.read_bytes()[:8] == PNG


# -- a GPU's traces, drawn with titles from the same run -----------------------


class _FakeTrace:
    """What ``traced_panels`` reads of a ``Trace``."""

    def __init__(self, rows: list[TraceRow], spans: list[Span]) -> None:
        self.rows = rows
        self.spans = spans


def _span(index: int, lane: TraceRow, start: float, end: float) -> Span:
    return Span(index, lane.stream_id, lane.kind, lane.priority, start, end, "MainThread")


def test_gpu_traces_are_titled_with_the_figures_drawn() -> None:
    compute = [TraceRow(i, "compute", 0) for i in range(4)]
    comm, high = TraceRow(4, "comm", 0), TraceRow(6, "high_priority", -5)
    lanes = [*compute, comm, TraceRow(5, "comm", 0), high]
    serial = _FakeTrace(lanes, [_span(i, compute[3], 2.6 * i, 2.6 * i + 2.5) for i in range(16)])
    rounds = [
        *(_span(i, compute[i], 0.1, 29.0) for i in range(3)),
        _span(3, compute[3], 2.1, 6.3),
        *(_span(4 + i, compute[i], 30.0, 59.0) for i in range(3)),
        _span(7, high, 32.1, 32.15),
    ]
    pipe = PipelineFigures("cupy", PipelineSetup(), 20.6, 20.0, 24.7, 1.5, 42.9, 25.5)
    pipe.traces = [("one stream", cast(Trace, serial))]
    prio = PriorityFigures("cupy", 4.2, 0.05, 29.0, 3, trace=cast(Trace, _FakeTrace(lanes, rounds)))
    one, normal, urgent = traced_panels(pipe, prio)
    assert one.lanes == ("compute#3 (prio 0)",) and figure_in(one.title) == round(one.end_ms, 1)
    assert {bar.stage for bar in one.bars} == {"compute lease"}
    for panel, request in ((normal, rounds[3]), (urgent, rounds[7])):
        assert figure_in(panel.title) == round(request.duration_ms, 2)
        (drawn,) = [bar for bar in panel.bars if bar.stage == "urgent"]
        assert drawn.duration_ms == pytest.approx(request.duration_ms)
        assert min(bar.start_ms for bar in panel.bars) == 0  # its own axis
        assert [bar.stage for bar in panel.bars].count("flood") == 3
    assert urgent.lanes[-1] == "high_priority#6 (prio -5)"


def test_panels_are_plain_data() -> None:
    panel = Panel("t", ("a",), (Bar("a", "compute", 1.0, 2.5), Bar("a", "copy-in", 0.0, 1.0)))
    assert panel.end_ms == 2.5
    assert [bar.stage for bar in panel.lane("a")] == ["copy-in", "compute"]


@pytest.mark.parametrize("min_copy", [0, 2 * (64 << 10)], ids=["copy-per-chunk", "copy-groups"])
def test_the_model_refills_a_buffer_only_after_its_copy_out(min_copy: int) -> None:
    import numpy as np

    from cupystreams import CudaStreamPool
    from cupystreams._bench.model_engine import ModelEngine
    from cupystreams.pipeline import Pipeline

    with CudaStreamPool(backend="host") as pool:
        # One group in flight: each copy-in refills the buffer the last group used.
        pipe = Pipeline(
            pool,
            lambda x: x + 1,
            chunk_bytes=64 << 10,
            max_in_flight=1,
            min_copy_bytes=min_copy,
        )
        engine = ModelEngine(pool._backend, mib_per_byte=8 / (64 << 10), kernel_ms=1.0)
        pipe._engine = engine
        data = np.zeros(8 * (16 << 10), np.float32)
        out = np.zeros_like(data)
        _, intervals = engine.timed(lambda: pipe.run(data, out))
        assert np.array_equal(out, data + 1)
    ordered = sorted(intervals, key=lambda i: i.start_ms)
    copies_in = [i for i in ordered if i.stage == "copy-in"]
    copies_out = [i for i in ordered if i.stage == "copy-out"]
    kernels = [i for i in ordered if i.stage == "compute"]
    assert len(copies_in) == len(copies_out) == (8 if min_copy == 0 else 4)
    assert len(kernels) == 8
    for refill, emptied in zip(copies_in[1:], copies_out, strict=False):
        assert refill.start_ms >= emptied.end_ms - 1e-9
