"""The cupystreams command: demo, bench, info, and how it chooses a backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GPU_COUNT

from cupystreams.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


@pytest.fixture(autouse=True)
def _no_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUPYSTREAMS_BACKEND", raising=False)


def test_info_on_the_host_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backend", "host"]) == 0
    out = lines(capsys)
    assert out[0].startswith("Host backend (--backend host)")
    text = "\n".join(out)
    for field in ("stream priorities", "hardware work queues", "adapter torch", "adapter jax"):
        assert field in text


def test_the_environment_variable_chooses_the_host_backend(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "host")
    assert main(["info"]) == 0
    assert "CUPYSTREAMS_BACKEND=host" in lines(capsys)[0]


def test_demo_on_the_host_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    assert main(["demo", "--backend", "host", "--quick", "--output", str(png)]) == 0
    out = lines(capsys)
    assert "host backend" in out[0].lower() and "simulated" in out[0]
    text = "\n".join(out)
    assert "pipeline" in text and "urgent request" in text and "memory" in text
    assert "differs" not in text  # the pipeline matched one stream
    assert png.read_bytes()[:8] == PNG


def test_demo_says_in_its_first_line_where_it_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "timeline.png"
    assert main(["demo", "--quick", "--output", str(png)]) == 0
    first = lines(capsys)[0]
    if GPU_COUNT:
        assert first.startswith("GPU ") and "cupy backend" in first
    else:
        assert first.startswith("No usable GPU") and "host backend" in first
    assert png.read_bytes()[:8] == PNG


def test_asking_for_the_gpu_without_one_fails_clearly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["info", "--backend", "cupy"])
    captured = capsys.readouterr()
    if GPU_COUNT:
        assert status == 0 and "stream priorities" in captured.out
    else:
        assert status == 2 and "host" in captured.err
        assert captured.out == ""


def test_bench_writes_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--backend", "host", "--quick", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert document["backend"] == "host" and document["quick"] is True
    results = document["results"]
    groups = {r["group"] for r in results}
    assert groups == {
        "lease", "peer", "goal", "threads", "pipeline", "priority", "memory", "adapters"
    }
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)), "every result has its own stable id"
    by_id = {r["id"]: r for r in results}
    for row in ("acquire_release", "acquire_release_timeout", "same_key", "two_keys", "with",
                "compute_context", "event_cycle"):
        assert by_id[f"lease.{row}"]["value"] > 0, row
    # The ratios that need no GPU are computed from the same run.
    goal = by_id["goal.timeout_vs_plain"]
    ratio = by_id["lease.acquire_release_timeout"]["value"] / by_id["lease.acquire_release"]["value"]
    assert goal["value"] == pytest.approx(ratio)
    by_name = {r["name"]: r for r in results}
    assert by_name["speedup of the pool over one stream"]["extra"]["identical"] is True
    assert by_name["stage bound"]["value"] > 0
    # Peers that need a GPU are reported as missing, not invented.
    assert by_id["peer.cupy_stream"]["value"] is None
    assert by_id["goal.with_vs_cupy_with"]["value"] is None
    text = capsys.readouterr().out
    assert "stage bound" in text and str(path) in text


def test_python_dash_m(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cupystreams", "info", "--backend", "host"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Host backend")


@pytest.mark.gpu
def test_info_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backend", "cupy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("GPU ")
    for field in ("compute capability", "stream priorities", "CUDA_DEVICE_MAX_CONNECTIONS", "CuPy"):
        assert field in text
