"""The JAX adapter: JAX → CuPy on a lease and CuPy on a lease → JAX, in stream order.

JAX's producer is slow on purpose: a jitted chain of large matmuls whose
every step changes the result, so a consumer that is not ordered after the
whole chain reads a wrong value. The lease's consumer is a plain CuPy copy,
which synchronizes with nothing on its own.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import pytest
from gpu_helpers import gpu_and, slow_fill

from cupystreams import CudaStreamPool

N = 1 << 16
SIDE = 4096  # matmul side: tens of ms for the whole chain
STEPS = 24


gpu_jax = gpu_and("jax")


@pytest.fixture
def adapter() -> Any:
    return importlib.import_module("cupystreams.adapters.jax")


@functools.cache
def _slow_chain() -> Any:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x: Any, eye: Any) -> Any:
        # Unrolled, so XLA queues it all at once (a while loop would make the
        # host wait for its trip count). Integers stay exact at any precision.
        for _ in range(STEPS):
            x = jnp.matmul(x, eye, precision=jax.lax.Precision.HIGHEST) + 1.0
        return x

    return chain


def _slow_jax_inputs() -> tuple[Any, Any, Any]:
    """A random integer matrix (host and device), the identity, with the chain compiled."""
    import jax.numpy as jnp
    import numpy as np

    host = np.random.default_rng().integers(0, 8, size=(SIDE, SIDE)).astype(np.float32)
    x = jnp.asarray(host)
    eye = jnp.eye(SIDE, dtype=jnp.float32)
    # Compile outside the race, on other input: JAX's allocator may hand the
    # race's output the buffer of this result, whose stale contents must differ.
    _slow_chain()(jnp.zeros_like(x), eye).block_until_ready()
    return host, x, eye


@gpu_jax
def test_wrong_array_types_are_refused(gpu_pool: CudaStreamPool, adapter: Any) -> None:
    import cupy
    import jax.numpy as jnp
    import numpy as np

    with gpu_pool.acquire_compute() as lease:
        with pytest.raises(TypeError, match=r"not a jax\.Array"):
            adapter.from_jax(np.zeros(3), lease)
        with pytest.raises(TypeError, match=r"not a cupy\.ndarray"):
            adapter.to_jax(jnp.zeros(3), lease)
        with pytest.raises(TypeError, match="is not a stream"):
            adapter.to_jax(cupy.zeros(3), "lease")


@gpu_jax
def test_from_jax_shares_memory_and_does_not_block_the_host(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    host, x, eye = _slow_jax_inputs()
    with gpu_pool.acquire_compute() as lease:
        y = _slow_chain()(x, eye)
        view = adapter.from_jax(y, lease)
        # The lease has nothing queued but the wait for JAX: it is busy only
        # if the hand-off left the waiting to the GPU.
        assert not lease.query(), "from_jax waited for JAX on the host"
        assert view.data.ptr == y.unsafe_buffer_pointer()
        lease.synchronize()
        assert view.shape == host.shape


@gpu_jax
def test_cupy_on_a_lease_reads_a_jax_result_only_when_it_is_ready(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy
    import numpy as np

    host, x, eye = _slow_jax_inputs()
    lease = gpu_pool.acquire_compute()  # not entered: from_jax alone must order
    try:
        with lease.cupy_stream:  # load the consumer before the race
            cupy.empty((SIDE, SIDE), dtype=cupy.float32).copy()
        lease.synchronize()
        y = _slow_chain()(x, eye)  # queued on JAX's stream, tens of ms of work
        view = adapter.from_jax(y, lease)
        with lease.cupy_stream:
            out = view.copy()  # a plain CuPy copy on the lease
        lease.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(out), host + STEPS)
    finally:
        lease.synchronize()
        lease.release()


@gpu_jax
def test_jax_reads_a_lease_result_only_after_the_lease_work(
    gpu_pool: CudaStreamPool, adapter: Any
) -> None:
    import cupy
    import numpy as np

    x = cupy.zeros(N, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()
    lease = gpu_pool.acquire_compute()  # not entered: to_jax alone must order
    try:
        np.asarray(adapter.to_jax(x, lease) + 1.0)  # load the consumer before the race
        slow_fill(x.data.ptr, N, 7.0, lease.cupy_stream)  # the lease writes late
        y = adapter.to_jax(x, lease)
        result = np.asarray(y + 1.0)  # JAX computes on its own stream, then copies out
        assert (result == 8.0).all(), "JAX read before the lease's write"
    finally:
        lease.synchronize()
        lease.release()
