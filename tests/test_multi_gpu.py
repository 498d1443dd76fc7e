"""Per-device pools on two GPUs (skipped with fewer; CUPYSTREAMS_REQUIRE_GPU=2 requires them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_pool_gpu import slow_fill

from cupystreams import CudaStreamPool, get_global_stream_pool
from cupystreams.pipeline import Pipeline

pytestmark = pytest.mark.gpu(count=2)


@pytest.fixture
def pools() -> Any:
    with (
        CudaStreamPool(2, 1, 1, backend="cupy", device=0) as zero,
        CudaStreamPool(2, 1, 1, backend="cupy", device=1) as one,
    ):
        yield zero, one


def test_a_pool_lives_on_its_device(pools: tuple[CudaStreamPool, CudaStreamPool]) -> None:
    import cupy

    zero, one = pools
    assert (zero.device, one.device) == (0, 1)
    cupy.cuda.Device(0).use()
    with one.acquire_compute() as lease:
        assert lease.cupy_stream.device_id == 1
        assert cupy.cuda.runtime.getDevice() == 1
        assert cupy.cuda.get_current_stream().ptr == lease.ptr
        data = cupy.ones(1024, dtype=cupy.float32)
        assert data.device.id == 1
    assert cupy.cuda.runtime.getDevice() == 0


def test_a_pipeline_runs_on_its_pools_device(pools: tuple[CudaStreamPool, CudaStreamPool]) -> None:
    """Small chunks: results are gathered by a kernel, loaded on each device it runs on."""
    import cupy

    data = np.arange(1 << 16, dtype=np.float32)
    for pool in pools:  # device 0 first: the kernel is then loaded on device 1 as well
        cupy.cuda.Device(0).use()
        pipe = Pipeline(pool, lambda x: x * 2 + 1, chunk_bytes=4096)
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        assert cupy.cuda.runtime.getDevice() == 0
        with pipe.capture(data, pipe.empty_host(data.shape)) as graph:
            assert np.array_equal(graph.run(), data * 2 + 1)


def test_a_block_that_leaves_another_device_current_is_put_right(
    pools: tuple[CudaStreamPool, CudaStreamPool],
) -> None:
    import cupy

    _, one = pools
    cupy.cuda.Device(0).use()
    with cupy.cuda.Device(1):
        before_on_1 = cupy.cuda.get_current_stream().ptr
    with one.acquire_compute() as lease:
        leased = lease.ptr
        cupy.cuda.Device(0).use()  # and never switched back to device 1
    assert cupy.cuda.runtime.getDevice() == 0
    with cupy.cuda.Device(1):
        assert cupy.cuda.get_current_stream().ptr == before_on_1 != leased


def test_global_pools_are_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import cupy

    monkeypatch.delenv("CUPYSTREAMS_BACKEND", raising=False)
    with cupy.cuda.Device(0):
        zero = get_global_stream_pool()
    with cupy.cuda.Device(1):
        one = get_global_stream_pool()
        assert get_global_stream_pool() is one
    assert zero is not one
    assert (zero.device, one.device) == (0, 1)


def test_cross_device_wait_orders_a_peer_copy(
    pools: tuple[CudaStreamPool, CudaStreamPool],
) -> None:
    import cupy

    zero, one = pools
    with cupy.cuda.Device(0):
        source = cupy.zeros(1 << 20, dtype=cupy.float32)
        cupy.cuda.Device(0).synchronize()
    with cupy.cuda.Device(1):
        target = cupy.zeros(1 << 20, dtype=cupy.float32)
    with zero.acquire_compute() as producer:
        slow_fill(source, 5.0)
        with one.acquire_comm() as mover:
            mover.wait(producer)  # records on device 0, waits on device 1
            cupy.cuda.runtime.memcpyPeerAsync(
                target.data.ptr, 1, source.data.ptr, 0, source.nbytes, mover.ptr
            )
            mover.synchronize()
            assert float(target.min()) == 5.0, "the peer copy ran before the producer"


def test_a_stream_of_another_device_is_a_clear_error(
    pools: tuple[CudaStreamPool, CudaStreamPool],
) -> None:
    zero, one = pools
    with one.acquire_compute() as lease, pytest.raises(ValueError, match="device 1"):
        zero.record_event(lease)
    before = zero.stats()
    with zero.acquire_compute(), one.acquire_comm() as foreign:
        event = zero.events.acquire()
        with pytest.raises(ValueError, match="device 1"):
            event.record(foreign)
        event.release()
    assert zero.stats().compute == before.compute


@pytest.mark.requires_module("torch")
def test_allreduce_example_reduces_correctly_under_torchrun() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "allreduce_overlap.py"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(example), "--check", "--buckets=4", "--bucket-mib=4", "--matmuls=8", "--size=4096"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check passed: 4 buckets all-reduced over 2 GPUs" in result.stdout


def test_cupy_nccl_example_reduces_on_comm_leases() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    try:  # cupy.cuda does not import its nccl module by itself
        from cupy.cuda import nccl
    except ImportError as error:
        pytest.fail(f"CuPy's NCCL bindings do not import here ({error}); the GPU machine has them")
    if not nccl.available:
        pytest.fail("CuPy was built without NCCL here; the GPU machine has it")
    example = Path(__file__).resolve().parent.parent / "examples" / "cupy_nccl_overlap.py"
    result = subprocess.run(
        [sys.executable, str(example), "--check", "--buckets=3", "--elements=65536"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, NCCL_NVLS_ENABLE="0"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check passed: 3 buckets all-reduced over" in result.stdout


def test_peer_copy_example_reduces_on_comm_leases() -> None:
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "peer_allreduce_overlap.py"
    # Eight slow products before each bucket's value: a reduction that does not
    # wait for them adds the zeros the buckets start with.
    result = subprocess.run(
        [sys.executable, str(example), "--check", "--buckets=4", "--bucket-mib=4",
         "--matmuls=8", "--size=4096"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "check passed: 4 buckets all-reduced over 2 GPUs" in result.stdout
