"""``cupystreams demo``: what a pool buys, in one short table and a timeline.

Three scenes: the chunked pipeline on one stream and on the pool (with its
efficiency against the stage bound), one urgent request inside a flood of
normal work at normal and at high priority, and the device memory CuPy keeps
cached with a fresh stream per task versus pooled streams.

On a GPU every figure is measured, and the timeline draws one more traced run
of each scene (its titles quote those runs, not the table's medians). On the
host backend there is no device to measure: the scenes run on host streams
and a device model (``model.py``) times their work as an H100 would run it,
so the figures are deterministic, labelled modelled, and the timeline draws
the very runs the table quotes. The command's first line says so before the
demo prints anything (``cli.choose_backend``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .._trace import Span, Trace
from .memory import MemoryFigures, measure_memory, model_memory
from .model import H100
from .pipeline_bench import PipelineFigures, PipelineSetup, measure_pipeline
from .priority import FLOOD_STREAMS, PriorityFigures, measure_priority
from .timeline import Bar, Panel, draw_timeline

__all__ = ["demo_setup", "run_demo"]


def demo_setup(backend: str, quick: bool) -> PipelineSetup:
    """The pipeline the demo runs: 16 x 64 MiB (8 x 16 MiB when quick), measured or modelled."""
    return PipelineSetup(
        chunks=8 if quick else 16, chunk_mib=16 if quick else 64, repeats=3 if quick else 7
    )


def run_demo(console: Console, backend: str, quick: bool, timeline: str | os.PathLike[str]) -> None:
    """Run the three scenes, print the table, write the timeline.

    On the host backend the caller's first line has said that device time is
    modelled; every modelled figure says so again where it is printed.
    """
    modelled = backend == "host"
    setup = demo_setup(backend, quick)
    size = f"{setup.chunks} x {setup.chunk_mib} MiB"
    with console.status(f"pipeline: {size}, one stream vs the pool ..."):
        pipe = measure_pipeline(backend, setup, trace=True)
    with console.status("priority: one request inside a flood ..."):
        prio = measure_priority(backend, repeats=2 if quick else 3, trace=True)
    with console.status("memory: fresh streams vs pooled streams ..."):
        memory = model_memory() if modelled else measure_memory()
    console.print(demo_table(backend, size, pipe, prio, memory))
    if modelled:
        console.print(
            f"Modelled device: one copy engine each way and {H100.sms} SMs at an "
            f"{H100.name}'s measured speeds; the pool, its leases and the pipeline's results "
            "are real (host streams, small arrays).",
            soft_wrap=True,
        )
    if not pipe.identical:
        console.print("[bold red]the pipeline's result differs from one stream's[/]")

    if modelled:
        panels = [*pipe.panels, *prio.panels]
        xlabel = "modelled device time (ms)"
    else:
        panels = traced_panels(pipe, prio)
        xlabel = "device time (ms)"
    draw_timeline(timeline, panels, xlabel)
    console.print(f"timeline written to {os.fspath(timeline)}", soft_wrap=True, markup=False)


def demo_table(
    backend: str, size: str, pipe: PipelineFigures, prio: PriorityFigures, memory: MemoryFigures
) -> Table:
    """The three scenes side by side; modelled figures say so in every cell."""
    title = f"cupystreams demo ({backend} backend"
    title += f": device time modelled on an {pipe.model})" if pipe.model else ")"
    table = Table(title=title, title_justify="left")
    table.add_column("scene")
    table.add_column("without the pool", justify="right")
    table.add_column("with the pool", justify="right")
    table.add_column("gain")
    table.add_row(
        f"pipeline, {size}",
        f"{pipe.one_stream_ms:.1f} ms (one stream{_tag(pipe.model)})",
        f"{pipe.pipeline_ms:.1f} ms" + (" (modelled)" if pipe.model else ""),
        f"{pipe.one_stream_ms / pipe.pipeline_ms:.2f}x faster; "
        f"{pipe.efficiency(pipe.pipeline_ms):.2f} of the bound ({pipe.bound_ms:.1f} ms)",
    )
    table.add_row(
        "urgent request in a flood",
        f"{prio.normal_ms:.2f} ms (normal priority{_tag(prio.model)})",
        f"{prio.high_ms:.2f} ms (high-priority lease{_tag(prio.model)})",
        f"{prio.normal_ms / prio.high_ms:.1f}x sooner",
    )
    tag = _tag(H100.name if memory.modelled else None)
    table.add_row(
        f"CuPy memory held, {memory.tasks} x {memory.task_mib} MiB tasks",
        f"{memory.fresh_mib:.0f} MiB (fresh streams{tag})",
        f"{memory.pooled_mib:.0f} MiB ({memory.pooled_streams} streams{tag})",
        f"{memory.fresh_mib / max(memory.pooled_mib, 1e-9):.0f}x less",
    )
    return table


def _tag(model: str | None) -> str:
    """What a cell adds to say its figure is modelled (nothing when measured)."""
    return "" if model is None else ", modelled"


def traced_panels(pipe: PipelineFigures, prio: PriorityFigures) -> list[Panel]:
    """The GPU's traced runs as panels, each titled with the figure its bars show.

    Bars are leases: a one-stream run holds one lease per chunk, the pipeline
    a comm lease per copy and a compute lease per kernel. The priority trace
    holds a normal round then a high-priority round, each of ``FLOOD_STREAMS``
    flood leases and then the request's lease (``priority._one``'s order).
    """
    panels = []
    for name, trace in pipe.traces:
        bars = [_lease_bar(trace, span, span.stage or f"{span.kind} lease") for span in trace.spans]
        ms = max((bar.end_ms for bar in bars), default=0.0)
        panels.append(_panel(f"{name}, the run drawn: {ms:.1f} ms", trace, bars))
    if prio.trace is not None:
        trace = prio.trace
        spans = sorted(trace.spans, key=lambda span: span.index)
        per_round = FLOOD_STREAMS + 1
        names = ("urgent request at normal priority", "urgent request on the high-priority lease")
        for number, name in enumerate(names):
            round_spans = spans[number * per_round : (number + 1) * per_round]
            if len(round_spans) < per_round:
                break
            origin = min(span.start_ms for span in round_spans)
            *floods, request = round_spans
            bars = [_lease_bar(trace, span, "flood", origin) for span in floods]
            urgent = _lease_bar(trace, request, "urgent", origin)
            bars.append(dataclasses.replace(urgent, label=f"{request.duration_ms:.2f} ms"))
            title = f"{name}, the run drawn: {request.duration_ms:.2f} ms (its lease)"
            panels.append(_panel(title, trace, bars))
    return panels


def _lease_bar(trace: Trace, span: Span, stage: str, origin: float = 0.0) -> Bar:
    label = next(lane.label for lane in trace.rows if lane.stream_id == span.stream_id)
    return Bar(label, stage, span.start_ms - origin, span.end_ms - origin)


def _panel(title: str, trace: Trace, bars: Sequence[Bar]) -> Panel:
    """Only the rows of streams the bars use, in the trace's order."""
    used = {bar.lane for bar in bars}
    lanes = tuple(lane.label for lane in trace.rows if lane.label in used)
    return Panel(title, lanes, tuple(bars))
