"""The cupystreams command: demo, bench, info, and how it chooses a backend."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import GPU_COUNT

import cupystreams
from cupystreams import _backends
from cupystreams._backends import GpuProblem
from cupystreams.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
# The work each command does, patched in the tests of mistakes to prove it never ran.
WORK = {
    "demo": "cupystreams._bench.demo.run_demo",
    "bench": "cupystreams._bench.suite.run_bench",
    "info": "cupystreams._bench.info.collect_info",
}


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a child, for what only a fresh process shows."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(err: str, *needles: str) -> None:
    """Exactly one line on stderr, no traceback, containing every needle."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def work_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace each command's work by a recorder; the list says which ran."""
    calls: list[str] = []

    def recorder(command: str) -> Callable[..., Any]:
        def record(*args: object, **kwargs: object) -> list[Any]:
            calls.append(command)
            return []

        return record

    for command, target in WORK.items():
        monkeypatch.setattr(target, recorder(command))
    return calls


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
    assert out[0] == (
        "Host backend (--backend host): no GPU used; "
        "device time is modelled from H100 figures, not measured."
    )
    text = "\n".join(out)
    assert text.count("not measured") == 1, "one first line, said once"
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
        assert first.endswith("device time is modelled from H100 figures, not measured.")
    assert png.read_bytes()[:8] == PNG


def test_asking_for_the_gpu_without_one_fails_clearly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["info", "--backend", "cupy"])
    captured = capsys.readouterr()
    if GPU_COUNT:
        assert status == 0 and "stream priorities" in captured.out
    else:
        assert status == 2 and captured.out == ""
        assert_one_line_error(captured.err, "--backend cupy", "--backend host")
        assert "backend='host'" not in captured.err


def test_bench_writes_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--backend", "host", "--quick", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert document["backend"] == "host" and document["quick"] is True
    results = document["results"]
    groups = {r["group"] for r in results}
    assert groups == {
        "lease",
        "peer",
        "goal",
        "threads",
        "pipeline",
        "sweep",
        "priority",
        "memory",
        "adapters",
        "graph",
    }
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)), "every result has its own stable id"
    by_id = {r["id"]: r for r in results}
    for row in (
        "acquire_release",
        "acquire_release_timeout",
        "same_key",
        "two_keys",
        "with",
        "compute_context",
        "event_cycle",
    ):
        assert by_id[f"lease.{row}"]["value"] > 0, row
    # The ratios that need no GPU are computed from the same run.
    goal = by_id["goal.timeout_vs_plain"]
    ratio = (
        by_id["lease.acquire_release_timeout"]["value"] / by_id["lease.acquire_release"]["value"]
    )
    assert goal["value"] == pytest.approx(ratio)
    by_name = {r["name"]: r for r in results}
    assert by_name["speedup of the pool over one stream"]["extra"]["identical"] is True
    assert by_name["stage bound"]["value"] > 0
    # A step replayed from its graph against the same step issued eagerly.
    for row in ("eager_step", "replayed_step", "eager_step_device", "replayed_step_device"):
        assert by_id[f"graph.{row}"]["value"] > 0, row
    assert "no CUDA graph" in by_id["graph.replayed_step"]["note"]
    goal = by_id["goal.replayed_vs_eager_step_host"]
    assert goal["value"] == pytest.approx(
        by_id["graph.replayed_step"]["value"] / by_id["graph.eager_step"]["value"]
    )
    # Peers that need a GPU are reported as missing, not invented.
    assert by_id["peer.cupy_stream"]["value"] is None
    assert by_id["goal.with_vs_cupy_with"]["value"] is None
    for row in (
        "chunk_64KiB",
        "chunk_256KiB",
        "chunk_1MiB",
        "chunk_8MiB",
        "chunk_64MiB",
        "pageable_first",
        "pageable_again",
    ):
        assert by_id[f"pipeline.{row}"]["value"] is None  # measured on a GPU only
    # Device time on the host backend is modelled: the demo's pipeline and
    # CuPy's arenas, each figure labelled so, and the first line says it.
    assert by_id["pipeline.stage_bound"]["note"].endswith(", modelled")
    assert "16 chunks x 64 MiB" in by_id["pipeline.h2d_alone"]["note"]
    memory = [r for r in results if r["group"] == "memory"]
    assert [r["value"] for r in memory] == [256, 16]
    assert all("modelled" in r["note"] for r in memory)
    text = capsys.readouterr().out
    assert "stage bound" in text and str(path) in text
    assert text.splitlines()[0] == (
        "Host backend (--backend host): no GPU used; "
        "device time is modelled from H100 figures, not measured."
    )


def test_python_dash_m() -> None:
    done = run_python("-m", "cupystreams", "info", "--backend", "host")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Host backend")


@pytest.mark.gpu
def test_info_on_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backend", "cupy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("GPU ")
    for field in ("compute capability", "stream priorities", "CUDA_DEVICE_MAX_CONNECTIONS", "CuPy"):
        assert field in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"cupystreams {cupystreams.__version__}\n"
    assert cupystreams.__version__ == importlib.metadata.version("cupystreams")


def test_usage_errors_stay_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--backend", "gpu"])
    assert exited.value.code == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


GOOD_ARGS = {
    "demo": ["--output", "{tmp}/timeline.png"],
    "bench": ["--json", "{tmp}/bench.json"],
    "info": [],
}


def fill(args: list[str], tmp_path: Path) -> list[str]:
    return [arg.replace("{tmp}", str(tmp_path)) for arg in args]


@pytest.mark.parametrize("command", sorted(GOOD_ARGS))
def test_the_recorder_sees_work_that_runs(
    command: str, work_calls: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The control for the tests below: the same command with good arguments
    # reaches its work, so an empty record there means the work never ran.
    assert main([command, "--backend", "host", *fill(GOOD_ARGS[command], tmp_path)]) == 0
    assert work_calls == [command]


BAD_PATHS = [
    ("demo", "--output", "{tmp}/missing/x.png", "directory {tmp}/missing does not exist"),
    ("demo", "--output", "{tmp}/out.txt", "the timeline is a PNG; name a file ending in .png"),
    ("demo", "--output", "{tmp}/a-file/x.png", "{tmp}/a-file is not a directory"),
    ("demo", "--output", "{tmp}/a-dir.png", "is a directory"),
    ("bench", "--json", "{tmp}/missing/x.json", "directory {tmp}/missing does not exist"),
    ("bench", "--json", "{tmp}/bench.png", "the results are JSON; name a file ending in .json"),
    ("bench", "--json", "{tmp}/link.json", "directory {tmp}/missing does not exist"),
    ("demo", "--output", "{tmp}/fifo.png", "not a regular file; name a file ending in .png"),
]


@pytest.mark.parametrize(("command", "flag", "path", "why"), BAD_PATHS)
def test_a_bad_output_path_fails_before_the_work(
    command: str,
    flag: str,
    path: str,
    why: str,
    work_calls: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir.png").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "missing" / "y.json")  # leads nowhere
    if "fifo" in path:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no named pipes here")
        os.mkfifo(tmp_path / "fifo.png")  # a write would block, or fail at the end
    path, why = (text.replace("{tmp}", str(tmp_path)) for text in (path, why))
    assert main([command, "--backend", "host", "--quick", flag, path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, f"cupystreams {command}: {flag} {path}: {why}")
    assert work_calls == []
    assert not Path(path).is_file()


def test_a_usage_error_is_one_line_and_status_2(
    work_calls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["bench", "--json"], ["demo", "--quick=1"], ["nonsense"], []):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cupystreams"), (argv, err)
    assert work_calls == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_directory_that_cannot_be_written_fails_before_the_work(
    work_calls: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["bench", "--backend", "host", "--json", str(locked / "x.json")]) == 2
    assert_one_line_error(capsys.readouterr().err, "permission denied")
    assert work_calls == []


def test_a_write_that_fails_after_the_work_is_one_line(
    work_calls: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = str(tmp_path / "bench.json")

    def disk_full(target: str, *args: object) -> None:
        raise OSError(28, "No space left on device", target)

    monkeypatch.setattr("cupystreams._bench.suite.write_json", disk_full)
    assert main(["bench", "--backend", "host", "--json", path]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--json {path}: No space left on device")
    assert work_calls == ["bench"]


@pytest.mark.parametrize("command", sorted(GOOD_ARGS))
def test_an_unknown_backend_in_the_environment_fails_before_the_work(
    command: str,
    work_calls: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "gpu")
    assert main([command, *fill(GOOD_ARGS[command], tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, "CUPYSTREAMS_BACKEND='gpu'", "auto, cupy or host")
    assert work_calls == []


def test_a_backend_in_the_wrong_case_gets_a_hint(
    work_calls: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "HOST")
    assert main(["info"]) == 2
    assert_one_line_error(
        capsys.readouterr().err,
        "cupystreams info: CUPYSTREAMS_BACKEND='HOST' is not a backend; "
        "backend names are lower case: did you mean 'host'?",
    )
    assert work_calls == []


def test_an_unknown_backend_in_the_environment_in_a_real_process() -> None:
    done = run_python("-m", "cupystreams", "info", env={"CUPYSTREAMS_BACKEND": "gpu"})
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_error(done.stderr, "cupystreams info: CUPYSTREAMS_BACKEND='gpu'")


NO_DRIVER = GpuProblem(
    "no NVIDIA GPU or CUDA driver found",
    "libcuda.so.1: cannot open shared object file: No such file or directory",
)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> GpuProblem:
    """Every probe of the GPU, the CLI's and the library's, finds none."""
    monkeypatch.setattr(_backends, "_probe_cupy", lambda: NO_DRIVER)
    return NO_DRIVER


@pytest.mark.parametrize("command", sorted(GOOD_ARGS))
@pytest.mark.parametrize("how", ["flag", "environment"])
def test_asking_for_the_gpu_without_one_fails_before_the_work(
    command: str,
    how: str,
    no_gpu: GpuProblem,
    work_calls: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = [command, *fill(GOOD_ARGS[command], tmp_path)]
    if how == "flag":
        args += ["--backend", "cupy"]
    else:
        monkeypatch.setenv("CUPYSTREAMS_BACKEND", "cupy")
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    asked = "--backend cupy" if how == "flag" else "CUPYSTREAMS_BACKEND=cupy"
    assert_one_line_error(
        captured.err,
        f"cupystreams {command}: {asked} needs a usable GPU: {no_gpu}",
        "pass --backend host (or set CUPYSTREAMS_BACKEND=host)",
    )
    assert "backend='host'" not in captured.err  # Python words, not command-line ones
    assert work_calls == []


def test_without_a_gpu_auto_says_so_plainly_and_info_gives_the_detail(
    no_gpu: GpuProblem, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info"]) == 0
    out = lines(capsys)
    assert out[0] == (
        "No usable GPU (no NVIDIA GPU or CUDA driver found): "
        "running on the host backend (host threads)."
    )
    rest = " ".join(" ".join(line.split()) for line in out[1:])
    assert f"GPU none usable: {no_gpu}" in rest


def test_on_the_host_backend_info_gives_no_advice_to_use_it(
    no_gpu: GpuProblem, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--backend", "host"]) == 0
    rest = "\n".join(lines(capsys)[1:])
    for advice in ("backend='host'", "--backend host", "CUPYSTREAMS_BACKEND=host", "instead"):
        assert advice not in rest


@pytest.fixture
def no_cupy_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose driver loads but whose Python has no CuPy."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # None: the import raises ImportError
    monkeypatch.setattr(_backends, "_driver_problem", lambda: None)


def test_the_install_hint_survives_printing(
    no_cupy_on_a_gpu_machine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # rich reads "[cuda12]" as markup unless it is told the text is plain.
    hint = "pip install 'cupystreams[cuda12]' or 'cupystreams[cuda13]'"
    assert main(["info", "--backend", "cupy"]) == 2
    assert_one_line_error(capsys.readouterr().err, hint, "--backend host")
    assert main(["info"]) == 0
    out = lines(capsys)
    assert hint in out[0]
    assert hint in " ".join(" ".join(line.split()) for line in out[1:])  # the GPU row


def fake_cupy(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """A CuPy whose device count fails with the CUDA runtime's ``error``."""

    class Runtime:
        @staticmethod
        def getDeviceCount() -> int:
            raise RuntimeError(error)

    class Cuda:
        runtime = Runtime

    class Cupy:
        cuda = Cuda

    monkeypatch.setitem(sys.modules, "cupy", Cupy)


def test_without_a_driver_the_message_says_so_not_that_the_driver_is_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the CUDA runtime reports when there is no libcuda.so.1 at all.
    fake_cupy(monkeypatch, "cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setattr(_backends, "_driver_problem", lambda: "libcuda.so.1: cannot open")
    problem = _backends.gpu_problem()
    assert problem is not None
    assert problem.summary == "no NVIDIA GPU or CUDA driver found"
    assert str(problem).startswith("no NVIDIA GPU or CUDA driver found (libcuda.so.1")
    assert "cudaErrorInsufficientDriver" in problem.detail  # kept, but not leading
    # With the driver there, the same error is the driver's.
    monkeypatch.setattr(_backends, "_driver_problem", lambda: None)
    problem = _backends.gpu_problem()
    assert problem is not None and problem.summary == "CuPy cannot use the CUDA driver"


def test_a_driver_without_a_visible_device_says_which_variable_hides_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cupy(monkeypatch, "cudaErrorNoDevice: no CUDA-capable device is detected")
    monkeypatch.setattr(_backends, "_driver_problem", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problem = _backends.gpu_problem()
    assert problem is not None and problem.summary == "no CUDA device is visible"
    assert problem.detail.endswith("; CUDA_VISIBLE_DEVICES=''")


@pytest.mark.parametrize(
    ("command", "missing"), [("info", "rich"), ("bench", "rich"), ("demo", "matplotlib")]
)
def test_without_the_cli_extra_the_command_fails_in_one_line(
    command: str,
    missing: str,
    work_calls: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)
    assert main([command, "--backend", "host", *fill(GOOD_ARGS[command], tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(
        captured.err, f"{missing} not installed", "pip install 'cupystreams[cli]'"
    )
    assert work_calls == []


def test_the_library_imports_neither_rich_nor_matplotlib() -> None:
    code = (
        "import sys, cupystreams, cupystreams.pipeline, cupystreams.testing, cupystreams.cli\n"
        "print(sorted({'rich', 'matplotlib'} & set(sys.modules)))"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_the_testing_module_without_hypothesis_names_the_extra() -> None:
    code = "import sys; sys.modules['hypothesis'] = None; import cupystreams.testing"
    done = run_python("-c", code)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ImportError: cupystreams.testing needs Hypothesis, which comes with the test extra: "
        "pip install 'cupystreams[test]'"
    )


def test_the_library_requires_numpy_only_and_is_mit_licensed() -> None:
    requirements = importlib.metadata.requires("cupystreams") or []
    core = [r for r in requirements if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in core] == ["numpy"]
    cli = {r.split(">")[0] for r in requirements if 'extra == "cli"' in r}
    assert cli == {"rich", "matplotlib"}
    metadata = importlib.metadata.metadata("cupystreams")
    assert metadata["License-Expression"] == "MIT"
    assert "LICENSE" in metadata.get_all("License-File", [])
