"""scripts/bench_tables.py: BENCHMARKS.md's and the README's figures from one bench run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from script_helpers import ROOT, load_script

from cupystreams.cli import main as cupystreams_main

bench_tables = load_script("bench_tables")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run's JSON: the host backend, quick."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    assert cupystreams_main(["bench", "--backend", "host", "--quick", "--json", str(path)]) == 0
    return path


@pytest.fixture
def documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Copies of BENCHMARKS.md and README.md for the script to write."""
    names = ("BENCHMARKS.md", "README.md")
    copies = [Path(shutil.copy(ROOT / name, tmp_path / name)) for name in names]
    monkeypatch.setattr(bench_tables, "DOCUMENTS", tuple(copies))
    return copies


def test_the_documents_have_a_block_for_every_table() -> None:
    benchmarks = bench_tables.blocks_in((ROOT / "BENCHMARKS.md").read_text())
    readme = bench_tables.blocks_in((ROOT / "README.md").read_text())
    assert sorted(benchmarks + readme) == sorted(bench_tables.RENDERERS)
    assert readme == ["readme"]


def test_every_result_of_the_run_is_a_row_keyed_by_its_id(run: Path) -> None:
    document = json.loads(run.read_text())
    figures = bench_tables.Figures(document)
    text = (ROOT / "BENCHMARKS.md").read_text()
    rendered = bench_tables.render_document(text, figures)
    for result in document["results"]:
        assert f"| `{result['id']}` |" in rendered, result["id"]
    assert rendered.count(figures.source()) == len(bench_tables.blocks_in(text))
    assert "cupystreams bench --quick --backend host --json out.json" in figures.source()
    # A figure appears as the run gave it, three significant digits.
    lease = figures.by_id["lease.acquire_release"]
    assert f"| {bench_tables.figure(lease['value'], 'µs')} |" in rendered


def test_the_readme_quotes_the_same_run(run: Path) -> None:
    figures = bench_tables.Figures(json.loads(run.read_text()))
    readme = bench_tables.render_document((ROOT / "README.md").read_text(), figures)
    block = readme.split("<!-- bench:readme -->")[1].split("<!-- /bench:readme -->")[0]
    assert figures.source() in block
    fresh = figures.shown("memory.held_after_64_tasks_of_4_mib_fresh_stream_per_task")
    assert f"| {fresh} vs 16.0 MiB |" in block


def test_write_then_check(
    run: Path, documents: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_tables.main([str(run), "--check"]) == 1  # the committed figures are another run's
    before = [path.read_text() for path in documents]
    # A host-backend run would replace the GPU figures: written only when asked.
    assert bench_tables.main([str(run), "--write"]) == 2
    assert "--allow-partial" in capsys.readouterr().err
    assert [path.read_text() for path in documents] == before
    assert bench_tables.main([str(run), "--write", "--allow-partial"]) == 0
    assert bench_tables.main([str(run), "--check"]) == 0
    text = documents[0].read_text()
    documents[0].write_text(text.replace("| `lease.with` |", "| `lease.with` | edited |"))
    assert bench_tables.main([str(run), "--check"]) == 1


def test_a_file_that_is_no_run_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": "none"}')
    assert bench_tables.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a `cupystreams bench --json` file" in err


@pytest.mark.parametrize(
    "change",
    [
        lambda run: run.pop("tool"),  # another tool's JSON
        lambda run: run.update(results=[]),  # a run of nothing would empty every table
        lambda run: run["results"][0].pop("name"),
        lambda run: run["results"][0].update(id=1),
        lambda run: run["results"][0].update(value="fast"),
        lambda run: run["results"][-1].update(extra=[]),
    ],
)
def test_a_run_the_tables_cannot_read_writes_nothing(
    run: Path,
    documents: list[Path],
    tmp_path: Path,
    change: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    document = json.loads(run.read_text())
    change(document)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    before = [path.read_text() for path in documents]
    assert bench_tables.main([str(bad), "--write", "--allow-partial"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert [path.read_text() for path in documents] == before


def test_a_document_with_an_unknown_block_leaves_both_documents_as_they_were(
    run: Path, documents: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, readme = documents
    readme.write_text(readme.read_text() + "\n<!-- bench:bogus -->\n<!-- /bench:bogus -->\n")
    before = [path.read_text() for path in documents]
    assert bench_tables.main([str(run), "--write", "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md" in err and "'bogus'" in err
    assert [path.read_text() for path in documents] == before


def test_a_usage_error_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_tables.main(["run.json", "--write", "--check"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_figures_keep_three_significant_digits() -> None:
    shown = [bench_tables.figure(v, "ms") for v in (20.0, 0.112, 256, 1.5, 42.94, 1234.5)]
    assert shown == ["20.0 ms", "0.112 ms", "256 ms", "1.50 ms", "42.9 ms", "1,234 ms"]
    assert bench_tables.figure(None) == bench_tables.MISSING
