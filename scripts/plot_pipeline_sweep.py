"""Draw the pipeline's chunk-size sweep from a ``cupystreams bench --json`` file.

    python scripts/plot_pipeline_sweep.py bench.json docs/pipeline_sweep.png

One line per schedule (``Pipeline.run``, the same with a copy per chunk,
the loop written by hand, the replayed graph) and the stage bound measured
with the same chunks: the bytes moved each way per second, by chunk size.
Small chunks are bound by the host: the stage loops themselves issue one copy
and one kernel per chunk, which a replayed graph does not, and which
``Pipeline.run`` does not for copies (it copies small chunks in groups), so
these can beat that "bound". Exits 2 with one line when the file holds no
sweep.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LINES = (
    ("bound_ms", "stage bound, same chunks", "k:"),
    ("pool_ms", "Pipeline.run", "o-"),
    ("per_chunk_ms", "Pipeline.run, a copy per chunk", "o:"),
    ("hand_ms", "three streams by hand (CuPy)", "s--"),
    ("replay_ms", "Pipeline.capture, replayed", "^-"),
)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: plot_pipeline_sweep.py BENCH_JSON OUTPUT_PNG", file=sys.stderr)
        return 2
    source, target = Path(argv[0]), Path(argv[1])
    try:
        results = {r["id"]: r for r in json.loads(source.read_text())["results"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"plot_pipeline_sweep: {source}: not a bench JSON file ({exc})", file=sys.stderr)
        return 2
    rows = sorted(
        (row for key, row in results.items() if key.startswith("pipeline.chunk_")),
        key=lambda row: (row.get("extra") or {}).get("chunk_bytes", 0),
    )
    if not rows or any(row.get("value") is None for row in rows):
        print(f"plot_pipeline_sweep: {source} has no measured sweep (a GPU run)", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    sizes = [row["id"].removeprefix("pipeline.chunk_") for row in rows]
    extras = [row["extra"] for row in rows]
    for key, label, style in LINES:
        if all(extra.get(key) is not None for extra in extras):
            gib = [e["chunk_bytes"] * e["chunks"] / (1 << 30) for e in extras]
            rates = [size / (extra[key] / 1e3) for size, extra in zip(gib, extras, strict=True)]
            axis.plot(sizes, rates, style, label=label)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("chunk size")
    axis.set_ylabel("GiB/s each way")
    axis.set_title("256 MiB each way, fn = x * 2 + 1, page-locked arrays")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
