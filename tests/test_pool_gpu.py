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


@pytest.mark.parametrize("why", ["stream-busy", "affinity-off"])
def test_moved_affinity_key_orders_on_the_gpu(why: str) -> None:
    """A key that moves to another stream (its own is busy, or affinity is off) waits,
    on the device, for the slow work of its previous lease."""
    import cupy

    with CudaStreamPool(2, 0, 0, backend="cupy", enable_affinity=why != "affinity-off") as pool:
        data = cupy.zeros(1 << 20, dtype=cupy.float32)
        warm_copy(data)
        with pool.acquire_compute(affinity_key="k") as first:
            slow_fill(data, 3.0)
            keyed = first.stream
        blocker = None
        if why == "stream-busy":
            other = pool.acquire_compute()
            blocker = pool.acquire_compute()  # no other stream idle: the key's goes
            assert blocker.stream is keyed
            other.release()
        with pool.acquire_compute(affinity_key="k") as second:
            assert second.stream is not keyed
            copy = data.copy()
            second.synchronize()
        assert float(copy.min()) == 3.0, "the moved key ran before its earlier work"
        if blocker is not None:
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


def test_host_functions_run_on_a_thread_of_the_library_after_the_work(
    gpu_pool: CudaStreamPool,
) -> None:
    """No Python on a thread CUDA started: a host function runs on the library's
    own Python thread, and only once the work queued before it has finished."""
    import threading
    import time

    import cupy

    ran: list[tuple[threading.Thread, float]] = []
    data = cupy.zeros(1 << 20, dtype=cupy.float32)
    with gpu_pool.acquire_compute() as lease:
        gpu_helpers.slow_fill(data.data.ptr, data.size, 1.0, lease)  # spins SPIN_MS first
        started = time.monotonic()
        lease.launch_host_func(lambda: ran.append((threading.current_thread(), time.monotonic())))
        lease.synchronize()  # waits for the host function too
    assert len(ran) == 1
    thread, at = ran[0]
    assert not isinstance(thread, threading._DummyThread), "ran on a thread Python did not start"
    assert thread.name.startswith("cupystreams-host-functions")
    spin_s = gpu_helpers.SPIN_MS / 1e3
    assert at - started >= spin_s * 0.8, "the host function ran before the work it follows"


def test_a_dropped_pool_is_destroyed_where_it_is_dropped() -> None:
    """No reference cycle holds a pool: its streams are synchronized and destroyed
    on the thread that drops it, at once, and their memory arenas are freed."""
    import gc
    import threading
    import weakref

    dropped = CudaStreamPool(2, 1, 0, backend="cupy")
    with dropped.acquire_compute(affinity_key="k"):
        pass
    dropped.acquire_compute().release()  # records the key's end: a CUDA event held
    freed_on: list[str] = []
    for stream in dropped._streams:
        weakref.finalize(stream._handle, lambda: freed_on.append(threading.current_thread().name))
    collected = weakref.ref(dropped)
    gc.disable()
    try:
        del dropped, stream
        assert collected() is None, "a reference cycle keeps a dropped pool"
    finally:
        gc.enable()
    assert freed_on == [threading.current_thread().name] * 3


def test_a_keyed_lease_collected_in_a_cycle_is_not_lost(gpu_pool: CudaStreamPool) -> None:
    """A keyed lease dropped unreleased inside a reference cycle: its stream and
    its key come back, whichever thread runs the collection."""
    import gc

    lease = gpu_pool.acquire_comm(affinity_key="k")
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    del lease, cycle
    with (
        pytest.warns(ResourceWarning, match="dropped without release"),
        gpu_pool.acquire_compute() as other,
    ):
        other.launch_host_func(gc.collect)  # collects the lease on the library's thread
        other.synchronize()
    assert gpu_pool.stats().comm.leased == 0
    gpu_pool.acquire_comm(affinity_key="k", blocking=False).release()
