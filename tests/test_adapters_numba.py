"""The Numba adapter: a lease as the stream of a Numba kernel launch.

Both directions race a slow producer: CuPy's spinning kernel before a Numba
consumer, and a slow Numba kernel before a CuPy consumer. Numba reads and
writes through ``RawCudaArray`` (no stream in its array interface), so Numba
synchronizes nothing on its own.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import pytest
from gpu_helpers import RawCudaArray, gpu_and, raw_view, slow_fill

from cupystreams import CudaStreamPool

N = 1 << 16
THREADS = 256
BLOCKS = N // THREADS
SLOW_ITERATIONS = 1 << 22  # a dependent integer chain: tens of ms per thread


gpu_numba = gpu_and("numba")


@pytest.fixture
def adapter() -> Any:
    return importlib.import_module("cupystreams.adapters.numba")


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import numpy as np
    from numba import cuda

    if not hasattr(np, "row_stack"):
        # numba-cuda (0.30) registers an overload of np.row_stack while loading
        # its typing registry, and NumPy 2.4 removed that alias of np.vstack:
        # without it Numba cannot compile any kernel. Test-side workaround only.
        np.row_stack = np.vstack

    @cuda.jit
    def copy(src: Any, dst: Any) -> None:
        i = cuda.grid(1)
        if i < dst.size:
            dst[i] = src[i]

    @cuda.jit
    def slow_fill_numba(dst: Any, sink: Any, value: float, iterations: int) -> None:
        i = cuda.grid(1)
        acc = i
        for _ in range(iterations):
            acc = (acc * 1664525 + 1013904223) & 0xFFFFFFFF
        if i < dst.size:
            sink[i] = acc  # kept, so the chain cannot be optimized away
            dst[i] = value

    return copy, slow_fill_numba


def _zeros(n: int) -> Any:
    import cupy

    array = cupy.zeros(n, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()
    return array


def _raw(array: Any) -> RawCudaArray:
    return RawCudaArray(array.data.ptr, array.size, owner=array)


@gpu_numba
def test_numba_stream_is_built_once_per_pooled_stream(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    with gpu_pool.acquire_compute() as lease:
        stream = adapter.as_numba_stream(lease)
        assert int(stream) == lease.ptr
        assert stream.__cuda_stream__() == (0, lease.ptr)
        assert adapter.as_numba_stream(lease) is stream
        assert adapter.as_numba_stream(lease.stream) is stream
        assert int(adapter.as_numba_stream(lease.ptr)) == lease.ptr
    with pytest.raises(TypeError, match="is not a stream"):
        adapter.as_numba_stream(1.5)


@gpu_numba
def test_a_numba_kernel_on_the_lease_runs_after_the_lease_work(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy

    copy, _ = _kernels()
    x, out = _zeros(N), _zeros(N)
    with gpu_pool.acquire_compute() as lease:
        stream = adapter.as_numba_stream(lease)
        copy[BLOCKS, THREADS, stream](_raw(x), _raw(out))  # compile outside the race
        lease.synchronize()
        slow_fill(x.data.ptr, N, 7.0, lease.cupy_stream)  # CuPy writes late on the lease
        copy[BLOCKS, THREADS, stream](_raw(x), _raw(out))
        lease.synchronize()
    assert bool(cupy.all(out == 7.0)), "the Numba kernel ran before the lease's earlier work"


@gpu_numba
def test_the_lease_work_runs_after_a_numba_kernel_on_the_lease(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy

    _, slow_fill_numba = _kernels()
    x, sink = _zeros(N), _zeros(N)
    with gpu_pool.acquire_compute() as lease:
        stream = adapter.as_numba_stream(lease)
        slow_fill_numba[BLOCKS, THREADS, stream](_raw(x), _raw(sink), 1.0, 1)  # compile
        raw_view(x.data.ptr, N, owner=x).copy()  # load the consumer before the race
        lease.synchronize()
        slow_fill_numba[BLOCKS, THREADS, stream](_raw(x), _raw(sink), 7.0, SLOW_ITERATIONS)
        out = raw_view(x.data.ptr, N, owner=x).copy()  # CuPy on the lease (current)
        lease.synchronize()
    assert bool(cupy.all(out == 7.0)), "the lease's CuPy copy ran before the Numba kernel"
