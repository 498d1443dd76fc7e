"""Mutation check for the GPU race tests: remove one synchronization at a time.

For each mutation below, a scratch copy of the tree gets one synchronization
taken out (the line becomes ``pass``, a key's end is forgotten instead of
recorded, a host function stops waiting for its event, the capture check
before a release is dropped, a lease no longer joins a graph capture or is no
longer joined back, a pipeline stage no longer waits for the one before),
and the tests that guard it must then FAIL.
Before any mutation, all the tests involved must PASS on the untouched tree,
and none may skip: a test that fails or skips anyway proves nothing when it
fails under a mutation.

    python3 scripts/mutation_check.py                 # every mutation
    python3 scripts/mutation_check.py torch-use jax   # those whose names start so

Run on a GPU machine. ``CUPYSTREAMS_REQUIRE_GPU`` says how many GPUs the
tests may demand (1 if unset); the NCCL and cross-device mutations need 2 and
are listed as not run below that. Exits 1 if a mutation survived (some test
it guards still passed); 2, with one line, if the untouched tree did not pass
or the run cannot start (a prefix that names no mutation, too few GPUs), which
is checked before the tree is copied.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T = "tests/test_adapters_torch.py::"
J = "tests/test_adapters_jax.py::"
N = "tests/test_adapters_numba.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]
    gpus: int = 1


def _pass(line: str) -> str:
    """``line`` (with its indentation) replaced by ``pass`` at the same indentation."""
    return line[: len(line) - len(line.lstrip())] + "pass"


LEASE_WAIT = " " * 12 + "stream.wait_event(event)"
MOVED_KEY_WAIT = " " * 12 + "stream._backend.wait_event(stream._handle, event._handle)"
KEY_END_RECORD = " " * 16 + "self.keys.record_end_locked(unrecorded, stream)"
CAPTURE_CHECK = (  # the release's check (the drain of dropped leases has the same lines)
    "close() cannot destroy the stream during the query.\n"
    + " " * 16
    + "probe = stream._capture_probe\n"
    + " " * 16
    + "if probe is not None and probe():"
)
HOST_FUNCTION_WAIT = " " * 16 + "self._wait(event)"
NCCL_WAIT = " " * 16 + "comm.wait(compute)  # bucket complete before it is reduced"
PEER_WAIT = " " * 16 + "comm.wait(producer)"
CAPTURE_FORK = " " * 12 + "backend.wait_event(stream._handle, fork._handle)"
CAPTURE_JOIN_BACK = " " * 12 + "backend.wait_event(self._origin, back._handle)"
CAPTURE_REPLAYS = (
    "tests/test_capture.py::test_a_replay_computes_what_the_eager_step_computes",
    "tests/test_capture_gpu.py::test_a_cupy_capture_replays_what_the_eager_step_computes",
    "tests/test_capture_gpu.py::"
    "test_a_torch_capture_with_side_work_on_leases_replays_the_eager_result",
)
PIPELINE_COMPUTE_WAIT = " " * 16 + "engine.wait(compute, slot.ev_in)"
PIPELINE_COPY_OUT_WAIT = " " * 16 + "engine.wait(copy_out, event)"
TORCHRUN_WAIT = (
    " " * 8 + "comm.wait(compute)  # on the device: bucket i is complete before it is reduced"
)

MUTATIONS = [
    Mutation(
        "core-lease-wait", "cupystreams/_lease.py", LEASE_WAIT, _pass(LEASE_WAIT),
        ("tests/test_pool_gpu.py::test_wait_orders_two_leases",),
    ),
    Mutation(
        "core-lease-wait-cross-device", "cupystreams/_lease.py", LEASE_WAIT, _pass(LEASE_WAIT),
        ("tests/test_multi_gpu.py::test_cross_device_wait_orders_a_peer_copy",), gpus=2,
    ),
    Mutation(
        "core-moved-key-wait", "cupystreams/_affinity.py", MOVED_KEY_WAIT, _pass(MOVED_KEY_WAIT),
        ("tests/test_pool_gpu.py::test_moved_affinity_key_orders_on_the_gpu",),
    ),
    Mutation(
        "core-key-end-record", "cupystreams/_core.py", KEY_END_RECORD,
        " " * 16 + "stream._unrecorded_key = None  # the key's end forgotten, not recorded",
        ("tests/test_pool_gpu.py::test_moved_affinity_key_orders_on_the_gpu[stream-busy]",),
    ),
    Mutation(
        "core-capture-check", "cupystreams/_core.py", CAPTURE_CHECK,
        CAPTURE_CHECK.replace("if probe is not None and probe():", "if False:"),
        ("tests/test_pool_gpu.py::test_a_capturing_stream_cannot_be_released",),
    ),
    Mutation(
        "core-host-function-waits", "cupystreams/_backends/_callbacks.py",
        HOST_FUNCTION_WAIT, _pass(HOST_FUNCTION_WAIT),
        (
            "tests/test_pool_gpu.py::"
            "test_host_functions_run_on_a_thread_of_the_library_after_the_work",
        ),
    ),
    Mutation(
        "capture-fork", "cupystreams/_capture.py", CAPTURE_FORK, _pass(CAPTURE_FORK),
        CAPTURE_REPLAYS,
    ),
    Mutation(
        "capture-join-back", "cupystreams/_capture.py", CAPTURE_JOIN_BACK,
        _pass(CAPTURE_JOIN_BACK), CAPTURE_REPLAYS,
    ),
    Mutation(
        "pipeline-compute-waits", "cupystreams/pipeline.py",
        PIPELINE_COMPUTE_WAIT, _pass(PIPELINE_COMPUTE_WAIT),
        ("tests/test_pipeline.py::test_gpu_compute_waits_for_its_copy_in",),
    ),
    Mutation(
        "pipeline-copy-out-waits", "cupystreams/pipeline.py",
        PIPELINE_COPY_OUT_WAIT, _pass(PIPELINE_COPY_OUT_WAIT),
        (
            "tests/test_pipeline.py::test_gpu_stages_wait_for_a_slow_compute[copy-per-chunk]",
            "tests/test_pipeline.py::test_gpu_stages_wait_for_a_slow_compute[copy-groups]",
        ),
    ),
    Mutation(
        "torch-waits-for-lease", "adapters/torch.py",
        "order(waiter=_torch_ptr(torch_stream, device), producer=int(handle.ptr), device=device)",
        "pass",
        (T + "test_torch_reads_the_lease_output_after_torch_waits_for_lease",),
    ),
    Mutation(
        "torch-lease-waits-for-torch", "adapters/torch.py",
        "order(waiter=int(handle.ptr), producer=_torch_ptr(torch_stream, device), device=device)",
        "pass",
        (T + "test_the_lease_reads_torch_output_after_lease_waits_for_torch",),
    ),
    Mutation(
        "torch-protect", "adapters/torch.py", "tensor.record_stream(torch_stream)", "pass",
        (T + "test_protect_keeps_memory_the_lease_still_reads_from_new_tensors",),
    ),
    Mutation(
        "torch-use", "adapters/torch.py", "_set_torch_stream(*view.ids)", "pass",
        (T + "test_cupy_torch_cupy_pipeline_runs_in_order_on_one_lease",),
    ),
    Mutation(
        "jax-from-jax", "adapters/jax.py",
        "with CupyCurrent(handle):\n        return cupy.from_dlpack(array)",
        "with cupy.cuda.Device(device):\n        return cupy.from_dlpack(array)",
        (J + "test_cupy_on_a_lease_reads_a_jax_result_only_when_it_is_ready",),
    ),
    Mutation(
        "jax-to-jax", "adapters/jax.py",
        "with CupyCurrent(handle):\n        return jax.dlpack.from_dlpack(array)",
        "with cupy.cuda.Device(device):\n        return jax.dlpack.from_dlpack(array)",
        (J + "test_jax_reads_a_lease_result_only_after_the_lease_work",),
    ),
    Mutation(
        "numba-stream", "adapters/numba.py",
        "return numba_cuda.external_stream(int(handle.ptr))",
        "return numba_cuda.legacy_default_stream()",
        (
            N + "test_a_numba_kernel_on_the_lease_runs_after_the_lease_work",
            N + "test_the_lease_work_runs_after_a_numba_kernel_on_the_lease",
        ),
    ),
    Mutation(
        "example-cupy-nccl", "examples/cupy_nccl_overlap.py", NCCL_WAIT, _pass(NCCL_WAIT),
        ("tests/test_multi_gpu.py::test_cupy_nccl_example_reduces_on_comm_leases",), gpus=2,
    ),
    Mutation(
        "example-peer-copies", "examples/peer_allreduce_overlap.py", PEER_WAIT, _pass(PEER_WAIT),
        ("tests/test_multi_gpu.py::test_peer_copy_example_reduces_on_comm_leases",), gpus=2,
    ),
    Mutation(
        "example-torchrun", "examples/allreduce_overlap.py", TORCHRUN_WAIT, _pass(TORCHRUN_WAIT),
        ("tests/test_multi_gpu.py::test_allreduce_example_reduces_correctly_under_torchrun",),
        gpus=2,
    ),
]  # fmt: skip


GPUS = 1  # how many GPUs the tests may demand: set by main() from the environment


# pytest -q's last word: "2 failed, 1 passed, 1 warning in 3.1s"
SUMMARY = re.compile(r"^\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s")


@dataclass(frozen=True)
class Outcome:
    summary: str  # pytest's summary line, or why there is none
    lines: list[str]

    def count(self, word: str) -> int:
        found = re.search(rf"(\d+) {word}", self.summary)
        return int(found.group(1)) if found else 0


def pytest(tree: Path, tests: tuple[str, ...]) -> Outcome:
    """Run ``tests`` in ``tree`` (subprocesses the tests start import the tree too)."""
    env = dict(
        os.environ,
        CUPYSTREAMS_REQUIRE_GPU=str(GPUS),
        NCCL_NVLS_ENABLE="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
    )
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *tests],
            cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=600,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome("timed out after 600 s", [])
    lines = run.stdout.splitlines()
    summaries = [line for line in lines if SUMMARY.match(line.strip("= "))]
    return Outcome(
        summaries[-1].strip("= ") if summaries else f"no summary (exit {run.returncode})", lines
    )


def _fail(message: str) -> int:
    print(f"mutation_check: {message}", file=sys.stderr)
    return 2


def _visible_gpus() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device: no GPU to run on
        return 0


def main(argv: list[str]) -> int:
    from cupystreams.cli import _OneLineParser

    global GPUS
    parser = _OneLineParser(prog="mutation_check", description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="run the mutations whose names start so")
    prefixes = parser.parse_args(argv).prefixes
    # Everything is checked before the tree is copied and the tests run (minutes).
    raw = os.environ.get("CUPYSTREAMS_REQUIRE_GPU") or "1"
    if not raw.isdigit() or int(raw) < 1:
        return _fail(f"CUPYSTREAMS_REQUIRE_GPU={raw!r}: give the GPUs the tests may use: 1 or 2")
    GPUS = int(raw)
    names = [m.name for m in MUTATIONS]
    unknown = [p for p in prefixes if not any(name.startswith(p) for name in names)]
    if unknown:
        return _fail(f"no mutation starts with {', '.join(unknown)}; names: {', '.join(names)}")
    named = [m for m in MUTATIONS if not prefixes or m.name.startswith(tuple(prefixes))]
    chosen = [m for m in named if m.gpus <= GPUS]
    if not chosen:
        most = max(m.gpus for m in named)
        return _fail(f"every mutation chosen needs {most} GPUs; set CUPYSTREAMS_REQUIRE_GPU={most}")
    visible = _visible_gpus()
    if visible < GPUS:
        return _fail(f"the tests need {GPUS} GPU(s) and {visible} can be seen; run on a GPU host")
    for m in named:
        if m.gpus > GPUS:
            print(f"NOT RUN  {m.name}: needs {m.gpus} GPUs (CUPYSTREAMS_REQUIRE_GPU={m.gpus})")
    for m in chosen:
        count = (ROOT / m.path).read_text().count(m.old)
        if count != 1:
            return _fail(f"{m.name}: the text to mutate occurs {count} times in {m.path}, not once")
    status = 0
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        skipped = shutil.ignore_patterns(".git", ".venv", ".hypothesis", "*.egg-info")
        shutil.copytree(ROOT, tree, ignore=skipped)
        # The tests import cupystreams from the scratch tree (their working
        # directory); an editable install would still find the adapters in the
        # real tree, so the scratch package gets its own, as a wheel lays them out.
        link = tree / "cupystreams" / "adapters"
        if not link.exists():
            link.symlink_to(tree / "adapters", target_is_directory=True)
        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = pytest(tree, every_test)
        if baseline.count("passed") == 0 or any(
            baseline.count(word) for word in ("failed", "skipped", "error")
        ):
            print("\n".join(baseline.lines[-15:]), file=sys.stderr)
            return _fail(f"the tests do not all pass on the untouched tree ({baseline.summary})")
        print(f"untouched tree: {baseline.summary}")
        for m in chosen:
            file = tree / m.path
            original = file.read_text()
            file.write_text(original.replace(m.old, m.new))
            try:
                outcome = pytest(tree, m.tests)
            finally:
                file.write_text(original)
            # Caught only if every test case it guards failed, and nothing else happened.
            if outcome.count("failed") and not (
                outcome.count("passed") or outcome.count("skipped")
            ):
                print(f"CAUGHT   {m.name}: {outcome.summary}")
                for line in [line for line in outcome.lines if line.startswith("E ")][:2]:
                    print(f"         {line[:200]}")
            else:
                print(f"SURVIVED {m.name}: {outcome.summary}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
