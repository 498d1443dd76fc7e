"""The PyTorch adapter: cached torch streams, use(), protect() and ordering both ways.

Every ordering test races a slow producer (``gpu_helpers``) against a consumer
that reads through a raw pointer, so a missing wait shows as wrong data.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from gpu_helpers import RawCudaArray, gpu_and, raw_view, slow_copy, slow_fill, spin

from cupystreams import CudaStreamPool, LeaseError

N = 1 << 16


gpu_torch = gpu_and("torch")


@pytest.fixture
def adapter() -> Any:
    return importlib.import_module("cupystreams.adapters.torch")


@pytest.fixture(params=["default", "side"])
def torch_stream(request: pytest.FixtureRequest) -> Any:
    """torch's default stream (the legacy stream, pointer 0) or a stream of its pool."""
    import torch

    if request.param == "default":
        stream = torch.cuda.default_stream()
        assert stream.cuda_stream == 0
        return stream
    return torch.cuda.Stream()


def _zeros(n: int) -> Any:
    import cupy

    array = cupy.zeros(n, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()  # the zeros are in place before any race starts
    return array


@pytest.mark.requires_module("torch")
def test_a_host_backend_lease_is_refused(adapter: Any) -> None:
    with (
        CudaStreamPool(1, 0, 0, backend="host") as pool,
        pool.acquire_compute() as lease,
        pytest.raises(TypeError, match="backend='cupy'"),
    ):
        adapter.as_torch_stream(lease)


@gpu_torch
def test_torch_stream_is_built_once_per_pooled_stream(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    with gpu_pool.acquire_compute() as lease:
        stream = adapter.as_torch_stream(lease)
        assert stream.cuda_stream == lease.ptr
        assert stream.device.index == gpu_pool.device
        assert adapter.as_torch_stream(lease) is stream
        assert adapter.as_torch_stream(lease.stream) is stream
        assert adapter.as_torch_stream(lease.cupy_stream) is stream
        assert adapter.as_torch_stream(lease.ptr).cuda_stream == lease.ptr


@gpu_torch
def test_bad_arguments_are_refused(gpu_pool: CudaStreamPool, adapter: Any) -> None:
    import torch

    with pytest.raises(TypeError, match="is not a stream"):
        adapter.as_torch_stream("stream")
    with pytest.raises(TypeError, match="is not a stream"):
        adapter.use(True)
    with pytest.raises(ValueError, match="not a valid stream pointer"):
        adapter.as_torch_stream(-1)
    released = gpu_pool.acquire_compute()
    released.release()
    with pytest.raises(LeaseError):
        adapter.use(released)
    with gpu_pool.acquire_compute() as lease:
        with pytest.raises(TypeError, match="CUDA tensors"):
            adapter.protect(lease, torch.zeros(3))
        with pytest.raises(TypeError, match="CUDA tensors"):
            adapter.protect(lease, [1.0])


@gpu_torch
def test_use_makes_the_lease_current_for_torch_and_cupy_and_restores_both(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy
    import torch

    side = torch.cuda.Stream()
    outer_cupy = cupy.cuda.Stream(non_blocking=True)
    lease = gpu_pool.acquire_compute()  # not entered: use() alone must switch CuPy too
    try:
        with torch.cuda.stream(side), outer_cupy:
            use = adapter.use(lease)
            with pytest.raises(RuntimeError, match="boom"), use as torch_stream:
                assert torch_stream is adapter.as_torch_stream(lease)
                assert torch.cuda.current_stream().cuda_stream == lease.ptr
                assert cupy.cuda.get_current_stream().ptr == lease.ptr
                with pytest.raises(RuntimeError, match="already entered"):
                    use.__enter__()
                raise RuntimeError("boom")
            assert torch.cuda.current_stream().cuda_stream == side.cuda_stream
            assert cupy.cuda.get_current_stream().ptr == outer_cupy.ptr
    finally:
        lease.release()


@gpu_torch
def test_use_restores_a_cupy_stream_made_current_with_use(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    """``stream.use()`` sets CuPy's current stream without its ``with`` stack: the
    block must put back the stream that was current, not the stack's top."""
    import cupy

    mine = cupy.cuda.Stream(non_blocking=True)
    before = cupy.cuda.get_current_stream()
    lease = gpu_pool.acquire_compute()
    try:
        mine.use()
        with adapter.use(lease):
            assert cupy.cuda.get_current_stream().ptr == lease.ptr
        assert cupy.cuda.get_current_stream().ptr == mine.ptr, "the user's stream was lost"
    finally:
        before.use()
        lease.release()


@gpu_torch
def test_cupy_torch_cupy_pipeline_runs_in_order_on_one_lease(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy
    import torch

    x = _zeros(N)

    def pipeline() -> Any:
        t = torch.as_tensor(RawCudaArray(x.data.ptr, N, owner=x), device="cuda")
        y = t + 1.0  # a torch op on torch's current stream, which must be the lease
        return cupy.from_dlpack(y) * 2.0  # and back to CuPy on the same stream

    with gpu_pool.acquire_compute() as lease, adapter.use(lease):
        pipeline()  # load its kernels before the race
        lease.synchronize()
        slow_fill(x.data.ptr, N, 7.0, lease.cupy_stream)  # CuPy writes late on the lease
        z = pipeline()
        lease.synchronize()
    assert bool(cupy.all(z == 16.0)), "torch ran outside the lease's stream order"


@gpu_torch
def test_torch_reads_the_lease_output_after_torch_waits_for_lease(
    gpu_pool: CudaStreamPool, adapter: Any, torch_stream: Any
) -> None:
    import torch

    x = _zeros(N)
    view = torch.as_tensor(RawCudaArray(x.data.ptr, N, owner=x), device="cuda")
    lease = gpu_pool.acquire_compute()
    try:
        with torch.cuda.stream(torch_stream):
            view.clone()  # load the consumer before the race
        torch.cuda.synchronize()
        slow_fill(x.data.ptr, N, 7.0, lease.cupy_stream)
        with torch.cuda.stream(torch_stream):
            adapter.torch_waits_for_lease(lease)
            copy = view.clone()  # on torch's stream, reading through a raw pointer
        torch_stream.synchronize()
        assert bool(torch.all(copy == 7.0)), "torch read before the lease's write"
    finally:
        lease.synchronize()
        lease.release()


@gpu_torch
def test_the_lease_reads_torch_output_after_lease_waits_for_torch(
    gpu_pool: CudaStreamPool, adapter: Any, torch_stream: Any
) -> None:
    import cupy
    import torch

    t = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    out = _zeros(N)
    lease = gpu_pool.acquire_compute()
    try:
        with torch.cuda.stream(torch_stream):  # load producer and consumer before the race
            t.fill_(0.0)
        with lease.cupy_stream:
            out[...] = raw_view(t.data_ptr(), N, owner=t)
        torch.cuda.synchronize()
        lease.synchronize()
        with torch.cuda.stream(torch_stream):
            spin(torch_stream.cuda_stream)  # torch's stream is busy for tens of ms,
            t.fill_(7.0)  # so this torch write lands late
            adapter.lease_waits_for_torch(lease)
        with lease.cupy_stream:
            out[...] = raw_view(t.data_ptr(), N, owner=t)  # a CuPy copy on the lease
        lease.synchronize()
        assert bool(cupy.all(out == 7.0)), "the lease read before torch's write"
    finally:
        torch.cuda.synchronize()
        lease.release()


@gpu_torch
def test_protect_keeps_memory_the_lease_still_reads_from_new_tensors(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy
    import torch

    # 16 MiB fills one caching-allocator segment exactly, and no cached block is
    # left over from earlier tests, so an unprotected free is the best fit for
    # the next allocation of that size.
    n = 4 << 20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    out = _zeros(n)
    lease = gpu_pool.acquire_compute()
    try:
        a = torch.full((n,), 3.0, device="cuda")  # allocated on torch's default stream
        torch.cuda.synchronize()
        a_ptr = a.data_ptr()
        slow_copy(a_ptr, out.data.ptr, n, lease.cupy_stream)  # the lease reads `a` late
        adapter.protect(lease, a)
        del a
        b = torch.empty(n, device="cuda")
        b.fill_(-1.0)
        reused = b.data_ptr() == a_ptr
        lease.synchronize()
        assert not reused, "torch gave the memory of `a` to a new tensor during the lease's read"
        assert bool(cupy.all(out == 3.0)), "the lease read memory torch had overwritten"
    finally:
        lease.synchronize()
        lease.release()
