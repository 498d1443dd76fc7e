"""``cupystreams bench``: every measurement with its peers, as a table and JSON."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import __version__
from .common import Result
from .info import collect_info
from .memory import measure_memory, memory_results, model_memory
from .overhead import lease_overhead, thread_scaling
from .pipeline_bench import PipelineSetup, measure_pipeline, pipeline_results
from .pipeline_sweep import measure_sweep
from .priority import measure_priority, priority_results

__all__ = ["bench_setup", "run_bench", "write_json"]


def bench_setup(backend: str, quick: bool) -> PipelineSetup:
    """16 x 64 MiB, the pipeline BENCHMARKS.md quotes and the demo runs.

    Measured on a GPU; on the host backend modelled, which takes one run of
    each variant whatever ``repeats`` says, in a fraction of a second.
    """
    return PipelineSetup(chunks=16, chunk_mib=64, repeats=3 if quick else 15)


def _adapter_results(backend: str, quick: bool) -> list[Result]:
    name = "adapter overhead"
    if backend != "cupy":
        return [Result("adapters", name, None, "µs", "needs a GPU (host backend run)")]
    try:
        module = importlib.import_module("cupystreams._bench.adapters")
    except ImportError as exc:
        return [Result("adapters", name, None, "µs", f"adapter benchmarks unavailable: {exc}")]
    rows: list[dict[str, Any]] = module.run_adapter_benchmarks(5 if quick else 21)
    results = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in ("id", "name", "median_us")}
        note = ""
        if isinstance(row.get("baseline_us"), (int, float)):
            note = f"vs {row.get('baseline')}: {row['baseline_us']:.2f} µs"
        name, value = str(row.get("name")), row.get("median_us")
        results.append(Result("adapters", name, value, "µs", note, extra, id=str(row["id"])))
    return results or [Result("adapters", name, None, "µs", "no framework installed")]


def _sections(backend: str, quick: bool) -> list[tuple[str, Callable[[], list[Result]]]]:
    repeats = 3 if quick else 9

    def memory() -> list[Result]:
        return memory_results(measure_memory() if backend == "cupy" else model_memory())

    return [
        ("lease and event overhead", lambda: lease_overhead(backend, quick)),
        ("1 vs 8 threads", lambda: thread_scaling(backend, quick)),
        (
            "pipeline vs bound, raw CuPy, one stream",
            lambda: pipeline_results(measure_pipeline(backend, bench_setup(backend, quick))),
        ),
        ("priority latency", lambda: priority_results(measure_priority(backend, repeats))),
        ("pipeline at every chunk size", lambda: measure_sweep(backend, quick)),
        ("memory held", memory),
        ("adapter overhead", lambda: _adapter_results(backend, quick)),
        ("graphs", lambda: importlib.import_module(".graphs", __package__).measure(backend, quick)),
    ]


def run_bench(console: Console, backend: str, quick: bool) -> list[Result]:
    """Run every section with a progress bar; print and return the results."""
    results: list[Result] = []
    sections = _sections(backend, quick)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=len(sections))
        for title, measure in sections:
            progress.update(task, description=title)
            results.extend(measure())
            progress.advance(task)
    console.print(results_table(results, backend))
    return results


def results_table(results: list[Result], backend: str) -> Table:
    table = Table(title=f"cupystreams bench ({backend} backend)", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("note")
    group = None
    for result in results:
        if result.group != group:
            if group is not None:
                table.add_section()
            group = result.group
        value = "n/a" if result.value is None else f"{result.value:.3g} {result.unit}"
        table.add_row(f"{result.group}: {result.name}", value, result.note)
    return table


def write_json(
    path: str | os.PathLike[str], results: list[Result], backend: str, quick: bool
) -> None:
    """Write the results with the machine they ran on."""
    document = {
        "tool": "cupystreams bench",
        "cupystreams": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend,
        "quick": quick,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "machine": dict(collect_info(backend)),
        "results": [result.to_dict() for result in results],
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
