"""Shared fixtures and markers.

``gpu`` tests skip without a CUDA device, and fail instead when
``CUPYSTREAMS_REQUIRE_GPU`` is set (1: one GPU required; 2: two GPUs, for the
multi-device tests). ``requires_module("torch")`` skips when a framework is
missing, and also fails under ``CUPYSTREAMS_REQUIRE_GPU``: the GPU machine has
every framework, so a skip there would hide a broken adapter.
"""

from __future__ import annotations

import collections
import gc
import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest

# The suite shares each GPU between CuPy, torch, JAX and NCCL subprocesses:
# JAX must not take 75% of the memory up front the moment it is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from cupystreams import CudaStreamPool, reset_global_pool

REQUIRED_GPUS = int(os.environ.get("CUPYSTREAMS_REQUIRE_GPU", "0") or "0")


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


GPU_COUNT = _gpu_count()


def _skip_or_fail(item: pytest.Item, reason: str) -> None:
    if REQUIRED_GPUS:
        pytest.fail(f"CUPYSTREAMS_REQUIRE_GPU={REQUIRED_GPUS} but {reason}", pytrace=False)
    pytest.skip(reason)


# A framework import (torch, JAX, Numba) adds hundreds of modules and millions of
# long-lived objects; every gc.collect() and leak scan afterwards would walk them
# all (seconds per test). They are frozen out of the collector's sight once.
NEW_MODULES_WORTH_A_FREEZE = 50
_modules_at_last_freeze = 0


def _freeze_newly_imported_objects() -> None:
    global _modules_at_last_freeze
    if len(sys.modules) - _modules_at_last_freeze >= NEW_MODULES_WORTH_A_FREEZE:
        gc.collect()
        gc.freeze()
        _modules_at_last_freeze = len(sys.modules)


def pytest_runtest_setup(item: pytest.Item) -> None:
    _freeze_newly_imported_objects()
    gpu = item.get_closest_marker("gpu")
    if gpu is not None:
        needed = int(gpu.kwargs.get("count", 1))
        if needed > GPU_COUNT:
            if needed > 1 and needed > REQUIRED_GPUS:
                pytest.skip(f"needs {needed} GPUs, {GPU_COUNT} visible")
            _skip_or_fail(item, f"needs {needed} GPU(s), {GPU_COUNT} visible")
    for marker in item.iter_markers("requires_module"):
        for name in marker.args:
            if importlib.util.find_spec(name) is None:
                _skip_or_fail(item, f"module {name!r} is not installed")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say why tests were skipped: one line per reason, with its count."""
    reasons: collections.Counter[str] = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, by reason", sep="-")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:5d}  {reason}")


def backend_params() -> list[object]:
    """``host`` always; ``cupy`` marked ``gpu``."""
    return ["host", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pool(backend: str) -> Iterator[CudaStreamPool]:
    """A small pool (2 compute, 1 comm, 1 high) on each backend, closed afterwards."""
    p = CudaStreamPool(compute_streams=2, comm_streams=1, high_priority_streams=1, backend=backend)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def big_pool(backend: str) -> Iterator[CudaStreamPool]:
    """The default shape (4 compute, 2 comm, 1 high) on each backend, closed afterwards."""
    p = CudaStreamPool(backend=backend)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def gpu_pool() -> Iterator[CudaStreamPool]:
    """A cupy pool (2 compute, 1 comm, 1 high) for tests marked ``gpu``, closed afterwards."""
    with CudaStreamPool(
        compute_streams=2, comm_streams=1, high_priority_streams=1, backend="cupy"
    ) as p:
        yield p


@pytest.fixture(autouse=True)
def _restore_cuda_state() -> Iterator[None]:
    """Restore the current device and CuPy stream, and forget global pools."""
    if GPU_COUNT:
        import cupy

        device = cupy.cuda.runtime.getDevice()
        stream = cupy.cuda.get_current_stream()
        yield
        cupy.cuda.runtime.setDevice(device)
        stream.use()
    else:
        yield
    reset_global_pool()
