"""Draw the pipeline's chunk-size sweep from a ``cupystreams bench --json`` file.

    python scripts/plot_pipeline_sweep.py bench.json docs/pipeline_sweep.png

One line per schedule (``Pipeline.run``, the same with a copy per chunk,
the loop written by hand, the replayed graph) and the stage bound measured
with the same chunks: the bytes moved each way per second, by chunk size.
Small chunks are bound by the host: the stage loops themselves issue one copy
and one kernel per chunk, which a replayed graph does not, and which
``Pipeline.run`` does not for copies (it copies small chunks in groups), so
these can beat that "bound". Exits 2 with one line, before drawing, when the
output cannot be written or the file holds no measured sweep.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

LINES = (
    ("bound_ms", "stage bound, same chunks", "k:"),
    ("pool_ms", "Pipeline.run", "o-"),
    ("per_chunk_ms", "Pipeline.run, a copy per chunk", "o:"),
    ("hand_ms", "three streams by hand (CuPy)", "s--"),
    ("replay_ms", "Pipeline.capture, replayed", "^-"),
)


def _sweep_rows(source: Path) -> list[dict[str, Any]]:
    """The run's sweep results, smallest chunks first, each checked for what is drawn.

    Raises:
        ValueError: The file is no bench run, or holds no measured sweep.
    """
    try:
        run = json.loads(source.read_text(encoding="utf-8"))
        results = {r["id"]: r for r in run["results"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a bench JSON file ({exc!r})") from exc
    rows = [row for key, row in results.items() if str(key).startswith("pipeline.chunk_")]
    if not rows or any(row.get("value") is None for row in rows):
        raise ValueError("has no measured sweep (a GPU run)")
    for row in rows:
        extra = row.get("extra")
        numbers = ("chunk_bytes", "chunks", "bound_ms", "pool_ms")
        if not isinstance(extra, dict) or not all(
            isinstance(extra.get(key), int | float) and extra[key] > 0 for key in numbers
        ):
            raise ValueError(f"{row.get('id')} lacks one of {', '.join(numbers)}")
    return sorted(rows, key=lambda row: row["extra"]["chunk_bytes"])


def main(argv: list[str]) -> int:
    from cupystreams.cli import UsageError, _check_writable, _OneLineParser

    parser = _OneLineParser(prog="plot_pipeline_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the JSON written by `cupystreams bench --json`")
    parser.add_argument("output", help="the PNG to draw")
    args = parser.parse_args(argv)
    # Everything that can fail is checked before anything is drawn.
    try:
        _check_writable("output", args.output, "the plot is a PNG", ".png")
    except UsageError as exc:
        print(f"plot_pipeline_sweep: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("matplotlib") is None:
        print("plot_pipeline_sweep: needs matplotlib: pip install 'cupystreams[cli]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        rows = _sweep_rows(Path(args.run))
    except ValueError as exc:
        print(f"plot_pipeline_sweep: {args.run}: {exc}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    sizes = [row["id"].removeprefix("pipeline.chunk_") for row in rows]
    extras = [row["extra"] for row in rows]
    gib = [e["chunk_bytes"] * e["chunks"] / (1 << 30) for e in extras]
    for key, label, style in LINES:
        if all(isinstance(extra.get(key), int | float) for extra in extras):
            rates = [size / (extra[key] / 1e3) for size, extra in zip(gib, extras, strict=True)]
            axis.plot(sizes, rates, style, label=label)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("chunk size")
    axis.set_ylabel("GiB/s each way")
    axis.set_title("256 MiB each way, fn = x * 2 + 1, page-locked arrays")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.output, dpi=110)
    plt.close(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
