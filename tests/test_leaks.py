"""Leaks: streams, events, leases, host threads and CuPy memory come back.

Every test here runs under the ``no_leaks`` fixture (as do the other
reliability files); the first tests check that the count it relies on sees
what it should, so a passing fixture means something.
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from reliability_helpers import LiveObjects, live_objects, no_leaks, record_figures

from cupystreams import CudaStreamPool, EventPool, _teardown
from cupystreams._backends._host import HostBackend


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    with no_leaks():
        yield


def grown(before: LiveObjects, after: LiveObjects) -> dict[str, int]:
    return {
        name: getattr(after, name) - getattr(before, name)
        for name in ("streams", "events", "leases", "host_threads")
    }


def test_the_count_sees_streams_events_leases_and_threads() -> None:
    start = live_objects()
    pool = CudaStreamPool(2, 1, 1, event_pool_size=4, backend="host")
    assert grown(start, live_objects()) == {
        "streams": 4,
        "events": 0,  # idle events are handles inside the pool, not PooledEvents
        "leases": 0,
        "host_threads": 4,
    }
    lease = pool.acquire_compute()
    event = pool.events.acquire()
    assert grown(start, live_objects())["leases"] == 1
    assert grown(start, live_objects())["events"] == 1
    lease.release()
    event.release()
    assert grown(start, live_objects())["leases"] == 0
    assert grown(start, live_objects())["events"] == 0
    pool.close()
    del event  # a released event object is still an object until dropped
    assert live_objects() == start


def test_a_pool_dropped_without_close_is_cleaned_up() -> None:
    start = live_objects()
    pool = CudaStreamPool(2, 1, 1, backend="host")
    with pool.acquire_compute(affinity_key="k") as lease:
        lease.launch_host_func(lambda: None)
    ref = weakref.ref(pool)
    del pool, lease
    gc.collect()
    assert ref() is None, "something keeps a dropped pool alive"
    assert live_objects() == start


def test_a_dropped_lease_returns_at_once_without_the_cycle_collector(backend: str) -> None:
    """A lease dropped unreleased comes back through reference counting alone, so a
    pool under load does not wait for a garbage collection to get its stream back."""
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        gc.disable()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                lease = pool.acquire_compute(affinity_key="k")
                ref = weakref.ref(lease)
                del lease
            assert ref() is None, "a lease sits in a reference cycle"
            assert pool.stats().compute.leased == 0
            assert any(issubclass(w.category, ResourceWarning) for w in caught)
        finally:
            gc.enable()


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_constructor_that_fails_midway_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """Stream creation failing (as cudaStreamCreate can, out of resources) after some
    streams exist: the streams already made, and their host threads, are released."""
    start = live_objects()
    create = HostBackend.create_stream
    calls = [0]

    def failing_create(self: HostBackend, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("injected: cudaStreamCreate failed")
        return create(self, *args)

    monkeypatch.setattr(HostBackend, "create_stream", failing_create)
    with pytest.raises(RuntimeError, match="injected"):
        CudaStreamPool(2, 1, 1, backend="host")
    monkeypatch.undo()
    leftover = grown(start, live_objects())
    assert leftover == dict.fromkeys(leftover, 0), f"left behind: {leftover}"


def test_pool_churn_returns_everything(backend: str) -> None:
    pools = 100 if backend == "host" else 40
    start = live_objects()
    for i in range(pools):
        with CudaStreamPool(2, 1, 1, backend=backend) as pool:
            with pool.acquire_compute(affinity_key=i) as a, pool.acquire_comm() as b:
                b.wait(a)
                a.record_event().release()
            pool.acquire_high_priority().release()
    assert live_objects() == start
    record_figures("pool-churn", backend=backend, pools=pools)


def test_event_churn_reuses_events(pool: CudaStreamPool) -> None:
    """Recording, waiting and releasing thousands of times creates no new event."""
    rounds = 2000
    created = pool.stats().events.created
    with pool.acquire_compute() as a, pool.acquire_compute() as b:
        for _ in range(rounds):
            b.wait(a)  # a temporary event, returned at once
            event = a.record_event()
            b.wait_event(event)
            event.release()
            with pool.events.event_context() as scratch:
                scratch.record(b)
    events = pool.stats().events
    assert (events.created, events.in_use) == (created, 0), events
    record_figures("event-churn", backend=pool.backend, rounds=rounds, created=events.created)


def test_affinity_keys_churn_keeps_a_bounded_number_of_events(backend: str) -> None:
    """Thousands of distinct keys: the key table forgets the oldest, and the events
    marking where each key's work ends are returned with them."""
    keys, bound = 3000, 16
    with CudaStreamPool(2, 1, 0, max_affinity_keys=bound, backend=backend) as pool:
        for key in range(keys):
            with pool.acquire_compute(affinity_key=key) as lease:
                lease.launch_host_func(lambda: None)
        in_use = pool.stats().events.in_use
        assert in_use <= bound, f"{in_use} events held for {bound} remembered keys"
        assert pool.stats().events.created <= bound + 8
    assert pool.stats().events.in_use == 0
    record_figures("key-churn", backend=backend, keys=keys, bound=bound, events_in_use=in_use)


def test_event_pool_bound_and_close(backend: str) -> None:
    events = EventPool(initial_size=2, max_size=4, backend=backend)
    start = events.stats()
    held = [events.acquire() for _ in range(50)]
    for event in held:
        event.release()
    stats = events.stats()
    assert (stats.idle, stats.in_use) == (4, 0), stats
    assert stats.created == start.created + 48
    events.clear()
    assert events.stats().idle == 0
    del held, event


# -- CuPy memory ---------------------------------------------------------------------


def _memory_pool() -> Any:
    import cupy

    cupy.cuda.Device().synchronize()
    mempool = cupy.get_default_memory_pool()
    mempool.free_all_blocks()
    return mempool


@pytest.mark.gpu
def test_close_leaves_no_memory_pool_bytes_for_its_streams() -> None:
    """Arrays made on leases of every kind, keyed and not, over many leases: once
    they are gone and the pool is closed, CuPy's pool holds what it held before."""
    import cupy

    mempool = _memory_pool()
    baseline = mempool.total_bytes()
    pool = CudaStreamPool(4, 2, 1, backend="cupy")
    acquires = [
        lambda: pool.acquire_compute(),
        lambda: pool.acquire_compute(affinity_key="k"),
        lambda: pool.acquire_comm(),
        lambda: pool.acquire_high_priority(),
    ]
    for round_ in range(8):
        for acquire in acquires:
            with acquire():
                data = cupy.arange(1 << 18, dtype=cupy.float32) * (round_ + 1)  # temporaries too
                total = float(data.sum())
                del data
            assert total > 0
    cached = mempool.total_bytes() - baseline
    assert cached > 0, "the leases' arrays were not pooled at all; the test proves nothing"
    pool.close()
    left = mempool.total_bytes() - baseline
    record_figures("memory-after-close", cached_bytes=cached, left_bytes=left)
    assert left == 0, f"{left} bytes of {cached} stayed in CuPy's pool after close()"


@pytest.mark.gpu
def test_an_array_that_outlives_the_pool_strands_no_memory() -> None:
    """An array made on a lease and freed after close() is the user's, not the pool's:
    its block returns to CuPy's cache (the arena of a stream that no longer exists),
    and CuPy's own free_all_blocks() releases it — nothing is stranded for good.
    The README documents this limit of close()."""
    import cupy

    mempool = _memory_pool()
    baseline = mempool.total_bytes()
    pool = CudaStreamPool(1, 0, 0, backend="cupy")
    with pool.acquire_compute():
        survivor = cupy.ones(1 << 20, dtype=cupy.float32)
    pool.close()
    assert float(survivor.sum()) == float(1 << 20)
    del survivor
    cupy.cuda.Device().synchronize()
    assert mempool.total_bytes() > baseline  # cached in the dead stream's arena
    mempool.free_all_blocks()
    left = mempool.total_bytes() - baseline
    assert left == 0, f"{left} bytes stranded in the arena of a closed pool's stream"


def _collect_on_a_thread_python_did_not_start() -> None:
    """gc.collect() on a thread started below threading, like CUDA's host-function thread."""
    import _thread

    done = threading.Event()

    def collect() -> None:
        try:
            gc.collect()
        finally:
            done.set()

    _thread.start_new_thread(collect, ())
    assert done.wait(30), "the collecting thread did not finish"


def test_a_pool_collected_on_a_foreign_thread_is_destroyed_on_a_python_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    destroyed_on: list[int] = []
    destroy = HostBackend.destroy_stream

    def recording_destroy(self: HostBackend, stream: Any) -> None:
        destroyed_on.append(threading.get_ident())
        destroy(self, stream)

    monkeypatch.setattr(HostBackend, "destroy_stream", recording_destroy)
    pool = CudaStreamPool(2, 1, 1, backend="host")
    with pool.acquire_compute(affinity_key="k"):
        pass  # the key keeps an event recorded at the lease's end
    events = weakref.ref(pool.events)
    ref = weakref.ref(pool)
    del pool
    _collect_on_a_thread_python_did_not_start()
    assert ref() is None, "the foreign thread's collection did not free the pool"
    # No stream destroyed there: CUDA refuses CUDA calls on its own threads.
    assert destroyed_on == [] and _teardown.parked_count() == (1, 0)
    assert events() is not None, "the event pool (CUDA events) was freed on that thread"

    CudaStreamPool(1, 0, 0, backend="host").close()  # a Python thread: destroys what was parked
    main = threading.get_ident()
    assert destroyed_on == [main] * 5  # the dropped pool's four streams, then the new one's
    assert _teardown.parked_count() == (0, 0)
    gc.collect()
    assert events() is None


def test_a_lease_collected_on_a_foreign_thread_is_released_on_a_python_thread() -> None:
    pool = CudaStreamPool(1, 0, 0, backend="host")
    lease = pool.acquire_compute(affinity_key="k")
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    del lease, cycle
    _collect_on_a_thread_python_did_not_start()
    # Parked, not released: a release may call CUDA, refused on CUDA's threads.
    assert _teardown.parked_count() == (0, 1)
    assert pool.stats().compute.leased == 1
    # The next acquire that leaves the fast path releases it first, so the
    # key is free again (otherwise: "this thread already holds a lease").
    with pytest.warns(ResourceWarning, match="dropped without release"):
        lease = pool.acquire_compute(affinity_key="k", timeout=5)
    assert _teardown.parked_count() == (0, 0)
    lease.release()
    assert pool.stats().compute.leased == 0
    pool.close()


def test_parked_leases_all_return_when_their_warning_is_an_error() -> None:
    pool = CudaStreamPool(2, 0, 0, backend="host")
    cycle: list[Any] = [pool.acquire_compute(), pool.acquire_compute()]
    cycle.append(cycle)
    del cycle
    _collect_on_a_thread_python_did_not_start()
    assert _teardown.parked_count() == (0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(ResourceWarning, match="dropped without release"):
            pool.acquire_compute(timeout=5)
    # Both came back before the error was raised; the acquire took nothing.
    assert _teardown.parked_count() == (0, 0)
    assert pool.stats().compute.leased == 0
    pool.close()
