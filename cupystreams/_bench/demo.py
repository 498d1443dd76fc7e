"""``cupystreams demo``: what a pool buys, measured, in one short table.

Three scenes on the chosen backend: the chunked pipeline on one stream and on
the pool (with its efficiency against the stage bound), one urgent request
inside a flood of normal work at normal and at high priority, and the device
memory CuPy keeps cached with a fresh stream per task versus pooled streams.
The traced runs are drawn to a timeline PNG.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from .._trace import render_timeline
from .memory import MemoryFigures, measure_memory
from .pipeline_bench import PipelineSetup, measure_pipeline
from .priority import measure_priority

__all__ = ["demo_setup", "run_demo"]


def demo_setup(backend: str, quick: bool) -> PipelineSetup:
    """The pipeline the demo runs: 16 x 64 MiB on a GPU, smaller simulated on the host."""
    if backend == "cupy":
        return PipelineSetup(
            chunks=8 if quick else 16, chunk_mib=16 if quick else 64, repeats=3 if quick else 7
        )
    # Host "copies" are memcpys that share the CPU and its memory bandwidth
    # with the simulated kernels, so the simulated kernel time dominates. On a
    # two-core machine a third of the runs are several times slower (the
    # threads queue for the cores): 7 repeats keep the median off them.
    return PipelineSetup(
        chunks=8 if quick else 16,
        chunk_mib=8,
        iterations=0,
        host_kernel_ms=1.0,
        repeats=3 if quick else 7,
    )


def run_demo(console: Console, backend: str, quick: bool, timeline: str | os.PathLike[str]) -> None:
    """Run the three scenes, print the table, write the timeline."""
    setup = demo_setup(backend, quick)
    size = f"{setup.chunks} x {setup.chunk_mib} MiB"
    with console.status(f"pipeline: {size}, one stream vs the pool ..."):
        pipe = measure_pipeline(backend, setup, trace=True)
    with console.status("priority: one request inside a flood ..."):
        prio = measure_priority(backend, repeats=2 if quick else 3, trace=True)
    memory: MemoryFigures | None = None
    if backend == "cupy":
        with console.status("memory: fresh streams vs pooled streams ..."):
            memory = measure_memory()

    table = Table(title=f"cupystreams demo ({backend} backend)", title_justify="left")
    table.add_column("scene")
    table.add_column("without the pool", justify="right")
    table.add_column("with the pool", justify="right")
    table.add_column("gain")
    table.add_row(
        f"pipeline, {size}",
        f"{pipe.one_stream_ms:.1f} ms (one stream)",
        f"{pipe.pipeline_ms:.1f} ms",
        f"{pipe.one_stream_ms / pipe.pipeline_ms:.2f}x faster; "
        f"{pipe.efficiency(pipe.pipeline_ms):.2f} of the bound ({pipe.bound_ms:.1f} ms)",
    )
    table.add_row(
        "urgent request in a flood",
        f"{prio.normal_ms:.2f} ms (normal priority)",
        f"{prio.high_ms:.2f} ms (high-priority lease)",
        f"{prio.normal_ms / prio.high_ms:.1f}x sooner",
    )
    if memory is not None:
        table.add_row(
            f"CuPy memory held, {memory.tasks} x {memory.task_mib} MiB tasks",
            f"{memory.fresh_mib:.0f} MiB (fresh streams)",
            f"{memory.pooled_mib:.0f} MiB ({memory.pooled_streams} streams)",
            f"{memory.fresh_mib / max(memory.pooled_mib, 1e-9):.0f}x less",
        )
    else:
        table.add_row("CuPy memory held", "n/a", "n/a", "needs CuPy's device memory pool (a GPU)")
    console.print(table)
    if backend == "host":
        console.print(
            "Host backend: copies are memcpys competing with the simulated kernels for the "
            "CPU, so the pool gains less than with a GPU's copy engines."
        )
    if not pipe.identical:
        console.print("[bold red]the pipeline's result differs from one stream's[/]")

    panels = list(pipe.traces)
    if prio.trace is not None:
        panels.append(
            (
                f"a request in a flood: normal priority {prio.normal_ms:.2f} ms, "
                f"then high priority {prio.high_ms:.2f} ms",
                prio.trace,
            )
        )
    render_timeline(timeline, panels, xlabel=f"{backend} time since each trace began (ms)")
    console.print(f"timeline written to {os.fspath(timeline)}", soft_wrap=True, markup=False)
