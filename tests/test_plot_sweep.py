"""scripts/plot_pipeline_sweep.py: the sweep plot, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_script

plot = load_script("plot_pipeline_sweep")


def sweep_run(path: Path) -> Path:
    """A run with a sweep of two sizes (made-up figures: the plot is under test)."""
    rows = []
    for label, size in (("1MiB", 1 << 20), ("64KiB", 64 << 10)):  # drawn smallest first
        extra = {"chunk_bytes": size, "chunks": (256 << 20) // size, "bound_ms": 6.0}
        extra.update(pool_ms=8.0, hand_ms=9.0, per_chunk_ms=10.0, replay_ms=6.5)
        rows.append({"id": f"pipeline.chunk_{label}", "value": 0.75, "extra": extra})
    path.write_text(json.dumps({"tool": "cupystreams bench", "results": rows}))
    return path


def test_a_sweep_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    output = tmp_path / "sweep.png"
    assert plot.main([str(sweep_run(tmp_path / "run.json")), str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("run", "output", "why"),
    [
        ("{tmp}/run.json", "{tmp}/missing/p.png", "directory {tmp}/missing does not exist"),
        ("{tmp}/run.json", "{tmp}/p.txt", "name a file ending in .png"),
        ("{tmp}/run.json", "{tmp}", "name a file ending in .png"),
        ("{tmp}/nothing.json", "{tmp}/p.png", "not a bench JSON file"),
        ("{tmp}/host.json", "{tmp}/p.png", "has no measured sweep (a GPU run)"),
        ("{tmp}/short.json", "{tmp}/p.png", "lacks one of chunk_bytes, chunks"),
    ],
)
def test_what_cannot_be_drawn_is_one_line_and_status_2(
    run: str, output: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_run(tmp_path / "run.json")
    host = {"tool": "cupystreams bench", "results": [{"id": "pipeline.chunk_1MiB", "value": None}]}
    (tmp_path / "host.json").write_text(json.dumps(host))
    short = {"tool": "cupystreams bench", "results": [{"id": "pipeline.chunk_1MiB", "value": 1}]}
    (tmp_path / "short.json").write_text(json.dumps(short))
    run, output, why = (text.replace("{tmp}", str(tmp_path)) for text in (run, output, why))
    assert plot.main([run, output]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert why in captured.err
    assert not Path(output).is_file()
