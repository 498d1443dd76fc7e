"""Core behaviour that only a real GPU can show: ordering, current stream, memory, graphs.

Ordering tests use a deliberately slow producer (a kernel that spins on
``clock64()`` for ~50 ms before it writes), so that a missing wait shows as
wrong data rather than passing by luck.
"""

from __future__ import annotations

from typing import Any

import gpu_helpers
import pytest

from cupystreams import CudaStreamPool, LeaseError, StreamState

pytestmark = pytest.mark.gpu


def slow_fill(out: Any, value: float) -> None:
    """Fill the float32 array ``out`` with ``value`` on the current stream, ~50 ms late."""
    import cupy

    gpu_helpers.slow_fill(out.data.ptr, out.size, value, cupy.cuda.get_current_stream())


def warm_copy(data: Any) -> None:
    """Load the copy kernel before a race: a first launch may synchronize the device."""
    import cupy

    data.copy()
    cupy.cuda.Device().synchronize()


def test_lease_is_the_current_cupy_stream_and_restores(gpu_pool: CudaStreamPool) -> None:
    import cupy

    outer = cupy.cuda.get_current_stream()
    with gpu_pool.acquire_compute() as lease:
        assert cupy.cuda.get_current_stream().ptr == lease.ptr != outer.ptr
        assert lease.__cuda_stream__() == (0, lease.ptr)
        assert lease.cupy_stream is lease.stream.stream
        data = cupy.zeros(1 << 20, dtype=cupy.float32)
        slow_fill(data, 1.0)
        assert not lease.query(), "the slow kernel did not run on the lease's stream"
        lease.synchronize()
        assert lease.query()
        assert float(data.sum()) == data.size
    assert cupy.cuda.get_current_stream().ptr == outer.ptr


def test_streams_have_the_devices_priorities(gpu_pool: CudaStreamPool) -> None:
    least, greatest = gpu_pool.priority_range
    assert greatest < least  # every GPU this library targets has priorities
    with gpu_pool.acquire_high_priority() as high, gpu_pool.acquire_compute() as normal:
        assert high.cupy_stream.priority == greatest
        assert normal.cupy_stream.priority == least


def test_wait_orders_two_leases(gpu_pool: CudaStreamPool) -> None:
    import cupy

    producer, consumer = gpu_pool.acquire_compute(), gpu_pool.acquire_comm()
    data = cupy.zeros(1 << 20, dtype=cupy.float32)
    warm_copy(data)
    with producer.cupy_stream:
        slow_fill(data, 7.0)
    consumer.wait(producer)
    with consumer.cupy_stream:
        copy = data.copy()
    consumer.synchronize()
    assert float(copy.min()) == 7.0, "the consumer ran before the producer's write"
    producer.release()
    consumer.release()


def test_wait_accepts_cupy_streams_of_no_particular_device(gpu_pool: CudaStreamPool) -> None:
    import cupy

    # CuPy gives Stream.null and Stream.from_external(...) device_id -1.
    with gpu_pool.acquire_compute() as lease, gpu_pool.acquire_comm() as other:
        for stream in (cupy.cuda.Stream.null, cupy.cuda.Stream.from_external(other)):
            assert stream.device_id == -1
            lease.wait(stream)
            event = gpu_pool.record_event(stream)
            event.synchronize()
            event.release()
        lease.synchronize()


def test_moved_affinity_key_orders_on_the_gpu() -> None:
    import cupy

    with CudaStreamPool(2, 0, 0, backend="cupy") as pool:
        data = cupy.zeros(1 << 20, dtype=cupy.float32)
        warm_copy(data)
        with pool.acquire_compute(affinity_key="k") as first:
            slow_fill(data, 3.0)
            keyed = first.stream
        blocker = pool.acquire_compute()
        assert blocker.stream is keyed
        with pool.acquire_compute(affinity_key="k") as second:
            assert second.stream is not keyed
            copy = data.copy()
            second.synchronize()
        assert float(copy.min()) == 3.0, "the moved key ran before its earlier work"
        blocker.release()


def test_close_frees_the_memory_pool_arenas_of_its_streams() -> None:
    import cupy

    mempool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    mempool.free_all_blocks()
    baseline = mempool.total_bytes()
    pool = CudaStreamPool(4, 0, 0, backend="cupy")
    leases = [pool.acquire_compute() for _ in range(4)]
    for lease in leases:
        with lease.cupy_stream:
            block = cupy.empty(4 << 20, dtype=cupy.uint8)
            del block
    assert mempool.total_bytes() >= baseline + 4 * (4 << 20)
    for lease in leases:
        lease.release()
    pool.close()
    assert mempool.total_bytes() == baseline
    assert all(s.state is StreamState.CLOSED for s in pool._streams)


def test_a_capturing_stream_cannot_be_released(gpu_pool: CudaStreamPool) -> None:
    import cupy

    lease = gpu_pool.acquire_compute()
    stream = lease.cupy_stream
    data = cupy.zeros(16, dtype=cupy.float32)
    with stream:
        stream.begin_capture()
        data += 1
        with pytest.raises(LeaseError, match="capturing"):
            lease.release()
        graph = stream.end_capture()
    assert not lease.released
    lease.release()
    graph.launch()
    cupy.cuda.Device().synchronize()
    assert float(data.sum()) == 16.0


def test_no_cuda_event_dies_on_a_host_function_thread(pool: CudaStreamPool) -> None:
    """CUDA refuses CUDA calls on the thread that runs host functions, and a
    garbage collection there frees whatever cyclic garbage holds. A released
    event must hold no CUDA event by then (it is destroyed where released)."""
    import gc

    events_pool = CudaStreamPool(1, 0, 0, backend="cupy")
    event = events_pool.events.acquire()
    cycle: list[Any] = [event]
    cycle.append(cycle)
    events_pool.close()
    event.release()  # into a closed pool: its CUDA event is destroyed now
    del event, cycle
    with pool.acquire_compute() as lease:
        lease.launch_host_func(gc.collect)  # collects the cycle on CUDA's thread
        lease.synchronize()
    # A CUDA event freed there would have raised cudaErrorNotPermitted in its
    # __del__, which pytest reports as an unraisable-exception error.


def test_a_pool_collected_on_a_host_function_thread_makes_no_cuda_call_there(
    gpu_pool: CudaStreamPool,
) -> None:
    """A pool dropped without close() is freed by the cycle collector, which may
    run on CUDA's host-function thread. Destroying its streams there would be a
    CUDA call CUDA refuses (a stream's synchronize could even hang): the
    teardown thread destroys them, and frees their CUDA events."""
    import gc
    import threading
    import weakref

    from cupystreams import _teardown

    dropped = CudaStreamPool(2, 1, 0, backend="cupy")
    with dropped.acquire_compute(affinity_key="k"):
        pass  # the key keeps a CUDA event recorded at the lease's end
    freed_on: list[str] = []
    for stream in dropped._streams:
        weakref.finalize(stream._handle, lambda: freed_on.append(threading.current_thread().name))
    collected = weakref.ref(dropped)
    gc.disable()  # no collection on this thread in between
    try:
        del dropped, stream
        with gpu_pool.acquire_compute() as lease:
            lease.launch_host_func(gc.collect)  # collects the pool on CUDA's thread
            lease.synchronize()
        assert collected() is None
        assert _teardown.wait_settled()
    finally:
        gc.enable()
    gc.collect()
    assert freed_on == [_teardown.THREAD_NAME] * 3, "streams freed elsewhere, or never"


def test_a_lease_collected_on_a_host_function_thread_is_not_lost(
    gpu_pool: CudaStreamPool,
) -> None:
    """A keyed lease dropped unreleased inside a reference cycle, collected on
    CUDA's host-function thread: its release records a CUDA event, which CUDA
    refuses there. The teardown thread releases it; neither its stream nor
    its key is lost."""
    import gc

    from cupystreams import _teardown

    lease = gpu_pool.acquire_comm(affinity_key="k")
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    del lease, cycle
    with pytest.warns(ResourceWarning, match="dropped without release"):
        with gpu_pool.acquire_compute() as other:
            other.launch_host_func(gc.collect)  # collects the lease on CUDA's thread
            other.synchronize()
        assert _teardown.wait_settled()
    assert gpu_pool.stats().comm.leased == 0
    gpu_pool.acquire_comm(affinity_key="k", blocking=False).release()
