"""Render the figures of BENCHMARKS.md and the README from one ``cupystreams bench`` run.

Each table of those documents that quotes ``cupystreams bench`` sits between
two markers, ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``, and is
rendered here from the run's JSON, with the device, the date and the command
that reproduces it; rows are keyed by the results' ``id``. So every figure
quoted in the two documents comes from one run.

    cupystreams bench --json bench.json                     # on the GPU machine
    python scripts/bench_tables.py bench.json               # print the tables
    python scripts/bench_tables.py bench.json --write       # put them in the documents
    python scripts/bench_tables.py bench.json --check       # exit 1 if a document differs

``--write`` takes a full GPU run; a host-backend or ``--quick`` run would
replace the documents' GPU figures, and is written only with
``--allow-partial``.

Its usage errors are one line, as the ``cupystreams`` command's are.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (ROOT / "BENCHMARKS.md", ROOT / "README.md")
MISSING = "—"

Result = dict[str, Any]
Run = dict[str, Any]


def figure(value: float | None, unit: str = "") -> str:
    """Three significant digits, no exponent; ``MISSING`` for a figure not measured."""
    if value is None:
        return MISSING
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) < 0.001:
        text = f"{value:.4f}"
    else:
        text = f"{value:#.3g}".rstrip(".")  # 20.0, 0.112, 256
    return f"{text} {unit}".strip()


def code(text: str) -> str:
    return f"`{text}`"


def table(header: list[str], rows: Iterable[list[str]], right: Iterable[int] = ()) -> str:
    aligned = set(right)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if i in aligned else "---" for i in range(len(header))))
    lines[-1] += " |"
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


class Figures:
    """The results of one run, by id, and where and how the run was made."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.results: list[Result] = run["results"]
        self.by_id = {result["id"]: result for result in self.results}

    def ids(self, prefix: str) -> list[str]:
        return [r["id"] for r in self.results if r["id"].startswith(prefix)]

    def value(self, result_id: str) -> float | None:
        result = self.by_id.get(result_id)
        return None if result is None else result["value"]

    def shown(self, result_id: str) -> str:
        result = self.by_id.get(result_id)
        return MISSING if result is None else figure(result["value"], result["unit"])

    def device(self) -> str:
        machine = self.run.get("machine", {})
        if self.run.get("backend") == "cupy":
            # "0: NVIDIA H100 80GB HBM3" -> the name
            return str(machine.get("device", "a GPU")).split(": ", 1)[-1]
        return "no GPU (host backend: device time modelled)"

    def command(self) -> str:
        flags = " --quick" if self.run.get("quick") else ""
        if self.run.get("backend") == "host":
            flags += " --backend host"
        return f"cupystreams bench{flags} --json out.json"

    def source(self) -> str:
        """The line above every table: device, date, command."""
        date = str(self.run.get("date", "?"))[:10]
        return f"{self.device()}, {date}, cupystreams {self.run.get('cupystreams', '?')}: " + code(
            self.command()
        )


def _rows(figures: Figures, ids: list[str]) -> list[list[str]]:
    return [
        [code(i), figures.by_id[i]["name"], figures.shown(i), figures.by_id[i]["note"]] for i in ids
    ]


def render_machine(f: Figures) -> str:
    machine = f.run.get("machine", {})
    rows = [[key, str(value)] for key, value in machine.items()]
    rows += [["Python", str(f.run.get("python", "?"))]]
    for key in ("cpus", "platform"):
        if key in f.run:
            rows.append([{"cpus": "host CPUs", "platform": "platform"}[key], str(f.run[key])])
    return table(["", ""], rows)


def render_lease(f: Figures) -> str:
    ids = f.ids("lease.") + f.ids("peer.")
    return table(["id", "operation", "µs per operation", "note"], _rows(f, ids), right=[2])


def render_goals(f: Figures) -> str:
    rows = []
    for i in f.ids("goal."):
        result = f.by_id[i]
        goal = result.get("extra", {})
        bound = (
            f"≤ {goal['goal']:g}"
            if "goal" in goal
            else f"≥ {goal['goal_at_least']:g}"
            if "goal_at_least" in goal
            else MISSING
        )
        rows.append([code(i), result["name"], f.shown(i), bound, result["note"]])
    return table(["id", "ratio", "measured", "goal", "verdict"], rows, right=[2])


def render_threads(f: Figures) -> str:
    return table(["id", "run", "throughput", "note"], _rows(f, f.ids("threads.")), right=[2])


_SWEEP = ("pipeline.chunk_", "pipeline.pageable_")


def render_pipeline(f: Figures) -> str:
    ids = [i for i in f.ids("pipeline.") if not i.startswith(_SWEEP)]
    return table(["id", "run", "ms", "note"], _rows(f, ids), right=[2])


def render_sweep(f: Figures) -> str:
    rows = []
    for i in f.ids("pipeline.chunk_"):
        extra = f.by_id[i].get("extra", {})

        def share(key: str, extra: dict[str, Any] = extra) -> str:
            value = extra.get(key)
            return MISSING if value is None else f"{value:.2f}"

        chunks = extra.get("chunks")
        per_chunk = (
            MISSING
            if not chunks or extra.get("pool_ms") is None
            else f"{extra['pool_ms'] * 1e3 / chunks:.1f} µs"
        )
        rows.append(
            [
                code(i),
                share("pool_efficiency"),
                share("per_chunk_efficiency"),
                share("hand_efficiency"),
                share("replay_efficiency"),
                per_chunk,
            ]
        )
    for i in f.ids("pipeline.pageable_"):
        rows.append([code(i), f.shown(i), "", "", "", f.by_id[i]["note"]])
    header = [
        "id",
        "Pipeline.run",
        "a copy per chunk",
        "by hand",
        "graph replay",
        "Pipeline.run per chunk",
    ]
    return table(header, rows, right=[1, 2, 3, 4, 5])


def render_graphs(f: Figures) -> str:
    return table(["id", "step", "host time", "note"], _rows(f, f.ids("graph.")), right=[2])


def render_priority(f: Figures) -> str:
    return table(["id", "request", "latency", "note"], _rows(f, f.ids("priority.")), right=[2])


def render_memory(f: Figures) -> str:
    return table(["id", "tasks", "held", "note"], _rows(f, f.ids("memory.")), right=[2])


def render_adapters(f: Figures) -> str:
    rows = []
    for i in f.ids("adapters."):
        result = f.by_id[i]
        extra = result.get("extra", {})
        baseline = extra.get("baseline")
        rows.append(
            [
                code(i),
                code(result["name"]),
                f.shown(i),
                code(baseline) if baseline else result["note"],
                figure(extra.get("baseline_us"), "µs") if baseline else MISSING,
            ]
        )
    return table(["id", "adapter call", "µs", "framework call", "µs"], rows, right=[2, 4])


def _pair(f: Figures, first: str, second: str) -> str:
    return f"{f.shown(first)} vs {f.shown(second)}"


def render_readme(f: Figures) -> str:
    """The README's figures: each claim with the ids it is drawn from."""
    one, pooled = "pipeline.one_stream_pipeline_run_serial", "pipeline.pipeline_run_on_the_pool"
    normal = "priority.request_in_a_flood_normal_priority"
    high = "priority.request_in_a_flood_high_priority_lease"
    fresh = "memory.held_after_64_tasks_of_4_mib_fresh_stream_per_task"
    kept = "memory.held_after_64_tasks_of_4_mib_4_pooled_streams"
    efficiency = f.by_id.get(pooled, {}).get("extra", {}).get("efficiency")
    bound = "" if efficiency is None else f" ({efficiency:.3f} of the stage bound)"
    rows = [
        [
            "a lease (`acquire_compute().release()`) vs `cupy.cuda.Stream()` create + destroy",
            _pair(f, "lease.acquire_release", "peer.cupy_stream"),
            "`lease.acquire_release`, `peer.cupy_stream`",
        ],
        [
            "`with pool.acquire_compute():` vs CuPy's own `with stream:`",
            _pair(f, "lease.with", "peer.cupy_with"),
            "`lease.with`, `peer.cupy_with`",
        ],
        [
            "16 chunks of 64 MiB copied in, transformed, copied out: one stream vs the pool",
            _pair(f, one, pooled) + bound,
            f"`{one}`, `{pooled}`",
        ],
        [
            "a short request inside a flood: normal vs high-priority lease",
            _pair(f, normal, high),
            f"`{normal}`, `{high}`",
        ],
        [
            "CuPy memory held after 64 tasks of 4 MiB: a fresh stream each vs 4 pooled streams",
            _pair(f, fresh, kept),
            f"`{fresh}`, `{kept}`",
        ],
    ]
    return table(["", "figure", "ids"], rows)


RENDERERS: dict[str, Callable[[Figures], str]] = {
    "machine": render_machine,
    "lease": render_lease,
    "goals": render_goals,
    "threads": render_threads,
    "pipeline": render_pipeline,
    "sweep": render_sweep,
    "graphs": render_graphs,
    "priority": render_priority,
    "memory": render_memory,
    "adapters": render_adapters,
    "readme": render_readme,
}
BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.DOTALL)


def render_block(name: str, figures: Figures) -> str:
    """A block's text between its markers: the source line, then the table."""
    return f"{figures.source()}\n\n{RENDERERS[name](figures)}\n"


def render_document(text: str, figures: Figures) -> str:
    """``text`` with every bench block rendered from ``figures``.

    Raises:
        KeyError: A block names no known table.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"unknown bench block {name!r}; known: {sorted(RENDERERS)}")
        return match.group(1) + render_block(name, figures) + match.group(4)

    return BLOCK.sub(replace, text)


def blocks_in(text: str) -> list[str]:
    return [match.group(2) for match in BLOCK.finditer(text)]


def load_run(path: str) -> Figures:
    """The run in the file at ``path``, checked as far as the tables read it.

    Raises:
        ValueError: The file cannot be read, or is not a ``cupystreams bench
            --json`` file (the message says what is wrong).
    """
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(run, dict) or run.get("tool") != "cupystreams bench":
        raise ValueError('no "tool": "cupystreams bench" at its top')
    results = run.get("results")
    if not isinstance(results, list) or not results:
        raise ValueError("no results")
    for result in results:
        if not isinstance(result, dict):
            raise ValueError(f"a result is {type(result).__name__}, not an object")
        for key in ("id", "name", "unit", "note"):
            if not isinstance(result.get(key), str):
                raise ValueError(f"result {result.get('id')!r} has no text {key!r}")
        value = result.get("value", False)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"result {result['id']!r} has no number (or null) as its value")
        if not isinstance(result.get("extra", {}), dict):
            raise ValueError(f"result {result['id']!r} has an extra that is not an object")
    return Figures(run)


def main(argv: list[str] | None = None) -> int:
    from cupystreams.cli import _OneLineParser

    parser = _OneLineParser(prog="bench_tables", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the JSON written by `cupystreams bench --json`")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update the documents in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a document differs")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="let --write put a host-backend or --quick run in the documents",
    )
    args = parser.parse_args(argv)
    # Everything is read, checked and rendered before anything is printed or
    # written: a bad run or document leaves the documents as they were.
    blocks: list[tuple[str, str]] = []
    originals: dict[Path, str] = {}
    rendered: dict[Path, str] = {}
    try:
        figures = load_run(args.run)
        if not (args.write or args.check):
            blocks = [(name, render_block(name, figures)) for name in RENDERERS]
        for path in DOCUMENTS if args.write or args.check else ():
            originals[path] = text = path.read_text(encoding="utf-8")
            if unknown := sorted(set(blocks_in(text)) - set(RENDERERS)):
                print(f"bench_tables: {path.name} has bench blocks {unknown} that name no "
                      f"table; known: {sorted(RENDERERS)}", file=sys.stderr)  # fmt: skip
                return 2
            rendered[path] = render_document(text, figures)
    except (ValueError, TypeError, KeyError) as exc:
        print(f"bench_tables: {args.run}: not a `cupystreams bench --json` file ({exc!r})",
              file=sys.stderr)  # fmt: skip
        return 2
    except OSError as exc:
        print(f"bench_tables: {exc}", file=sys.stderr)
        return 2
    run = figures.run
    if args.write and not args.allow_partial and (run.get("backend") != "cupy" or run.get("quick")):
        kind = "a --quick run" if run.get("quick") else f"a {run.get('backend')}-backend run"
        print(f"bench_tables: {args.run} is {kind}; its figures would replace the documents' "
              "GPU figures: pass --allow-partial to write it anyway", file=sys.stderr)  # fmt: skip
        return 2
    for name, block in blocks:
        print(f"<!-- bench:{name} -->\n{block}<!-- /bench:{name} -->\n")
    changed = {path: text for path, text in rendered.items() if text != originals[path]}
    if args.check:
        if changed:
            names = ", ".join(path.name for path in changed)
            print(f"bench_tables: {names} differ from {args.run}", file=sys.stderr)
            return 1
        return 0
    unwritable = [path.name for path in changed if not os.access(path, os.W_OK)]
    if unwritable:
        print(f"bench_tables: cannot write {', '.join(unwritable)}; nothing was written",
              file=sys.stderr)  # fmt: skip
        return 2
    for path, text in changed.items():
        path.write_text(text, encoding="utf-8")
        print(f"updated {path.name}: {', '.join(blocks_in(originals[path]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
