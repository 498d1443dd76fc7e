"""Leaks: streams, events, leases, host threads and CuPy memory come back.

Every test here runs under the ``no_leaks`` fixture (as do the other
reliability files); the first tests check that the count it relies on sees
what it should, so a passing fixture means something.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from reliability_helpers import LiveObjects, live_objects, no_leaks, record_figures, wait_until

from cupystreams import CudaStreamPool, EventPool, LeaseError, PoolClosedError, PoolTimeoutError
from cupystreams._affinity import AffinityTable
from cupystreams._backends._host import HostBackend
from cupystreams._core import PoolCore


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
    The manual's semantics page documents this limit of close()."""
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


def _collect_on_another_thread() -> str:
    """gc.collect() on a new thread; returns its name."""
    thread = threading.Thread(target=gc.collect, name="collector")
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the collecting thread did not finish"
    return thread.name


@contextlib.contextmanager
def no_collection_here() -> Iterator[None]:
    """No automatic collection on this thread: only an explicit one finds the garbage."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _record_threads(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[str]:
    """The name of the thread of every call of ``cls.method`` from now on."""
    names: list[str] = []
    original = getattr(cls, method)

    def recording(self: object, *args: Any) -> Any:
        names.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(cls, method, recording)
    return names


@pytest.fixture
def destroyed_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads on which host-backend streams are destroyed from now on."""
    return _record_threads(monkeypatch, HostBackend, "destroy_stream")


def test_a_dropped_pool_is_freed_where_it_is_dropped(destroyed_on: list[str]) -> None:
    """No reference cycle holds a pool: dropping the last reference closes it at once,
    on the dropping thread, without the cycle collector."""
    pool = CudaStreamPool(2, 1, 1, backend="host")
    with pool.acquire_compute(affinity_key="k"):
        pass
    pool.acquire_compute().release()  # the key's stream goes elsewhere: its end is recorded
    events = weakref.ref(pool.events)
    ref = weakref.ref(pool)
    with no_collection_here():
        del pool
        assert ref() is None, "a reference cycle keeps a dropped pool"
        assert events() is None, "a reference cycle keeps a dropped pool's events"
    assert destroyed_on == [threading.current_thread().name] * 4


def _capture_leaving_a_lease_joined(pool: CudaStreamPool) -> None:
    with pool.acquire_comm() as origin:
        try:
            with pool.capture(origin):
                left = pool.acquire_compute()
        except LeaseError:
            left.release()
            return
    raise AssertionError("the capture did not fail")


def _sync_all_after_a_failing_host_function(pool: CudaStreamPool) -> None:
    with pool.acquire_compute() as lease:
        lease.launch_host_func(lambda: None if pool.closed else 1 / 0)
    try:
        pool.sync_all()
    except ZeroDivisionError:
        return
    raise AssertionError("sync_all() did not raise")


@pytest.mark.parametrize(
    "failure", [_capture_leaving_a_lease_joined, _sync_all_after_a_failing_host_function]
)
def test_a_pool_whose_call_failed_is_still_freed_where_it_is_dropped(
    failure: Callable[[CudaStreamPool], None],
) -> None:
    """An error a pool raised and the caller handled must not keep the pool: no
    frame of the library may hold the error that holds that frame (a cycle that
    only the collector breaks, which kept every frame of the call, and the pool)."""
    with no_collection_here():
        pool = CudaStreamPool(2, 1, 0, backend="host")
        failure(pool)
        ref = weakref.ref(pool)
        del pool
        assert ref() is None, "the handled error of a failed call keeps the pool"


def test_a_pool_whose_key_leads_back_to_it_is_still_collected() -> None:
    class Worker:
        def __init__(self, pool: CudaStreamPool) -> None:
            self.pool = pool

        def step(self) -> None:
            with self.pool.acquire_compute(affinity_key=self):
                pass

    pool = CudaStreamPool(1, 0, 0, backend="host")
    worker = Worker(pool)
    worker.step()
    ref = weakref.ref(pool)
    del pool, worker
    gc.collect()
    assert ref() is None, "the pool's finalizer keeps the user's key, which keeps the pool"


def test_a_pool_whose_last_reference_was_a_forgotten_key_is_closed() -> None:
    """The key table forgets its least recently used key while the pool's lock is
    held. When that key held the last reference to the pool, the pool's finalizer
    must not run under that lock, where it cannot take it to close the pool."""

    class Worker:
        def __init__(self, pool: CudaStreamPool) -> None:
            self.pool = pool

    pool = CudaStreamPool(1, 0, 0, backend="host", max_affinity_keys=1)
    events, worker_thread = pool.events, pool._streams[0]._handle._worker
    worker = Worker(pool)
    with pool.acquire_compute(affinity_key=worker):
        pass
    lease = pool.acquire_compute(affinity_key="newer")
    ref = weakref.ref(pool)
    with no_collection_here():
        del pool, worker
        assert ref() is not None, "the key table holds the worker, which holds the pool"
        lease.release()  # the table forgets the worker's key: the pool's last reference
        assert ref() is None
        assert events._closed_reason is not None, "the dropped pool was never closed"
    worker_thread.join(10)
    assert not worker_thread.is_alive(), "the dropped pool's stream was never destroyed"


def test_a_lease_collected_in_a_cycle_is_released_by_the_collecting_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released_on = _record_threads(monkeypatch, PoolCore, "return_dropped")
    pool = CudaStreamPool(1, 0, 0, backend="host")
    lease = pool.acquire_compute(affinity_key="k")
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    with no_collection_here(), pytest.warns(ResourceWarning, match="dropped without release"):
        del lease, cycle
        collector = _collect_on_another_thread()
    assert released_on == [collector]
    assert pool.stats().compute.leased == 0
    # The key is free again (not "this thread already holds a lease").
    pool.acquire_compute(affinity_key="k", blocking=False).release()
    pool.close()


def test_a_thread_waiting_for_a_stream_gets_the_one_a_dropped_lease_held() -> None:
    pool = CudaStreamPool(1, 0, 0, backend="host")
    lease = pool.acquire_compute()
    got: list[bool] = []

    def wait_for_the_stream() -> None:
        with pool.acquire_compute(timeout=10):
            got.append(True)

    waiter = threading.Thread(target=wait_for_the_stream)
    waiter.start()
    deadline = time.monotonic() + 10
    while pool.stats().compute.waiting == 0:
        assert time.monotonic() < deadline, "the waiter never started waiting"
        time.sleep(0.001)
    cycle: list[Any] = [lease]
    cycle.append(cycle)
    with no_collection_here(), pytest.warns(ResourceWarning, match="dropped without release"):
        del lease, cycle
        _collect_on_another_thread()
        waiter.join(10)
    assert got == [True], "the waiter never got the dropped lease's stream"
    pool.close()


def test_a_lease_collected_while_its_thread_holds_the_lock_comes_back_next_time() -> None:
    """A collection can run inside one of the pool's own critical sections: the
    finalizer must neither deadlock on the lock nor lose the stream."""
    pool = CudaStreamPool(1, 0, 0, backend="host")
    cycle: list[Any] = [pool.acquire_compute()]
    cycle.append(cycle)
    with no_collection_here(), pytest.warns(ResourceWarning, match="dropped without release"):
        del cycle
        with pool._core.lock:  # as if the collection interrupted a critical section
            started = time.monotonic()
            gc.collect()
            assert time.monotonic() - started < 5, "the finalizer waited for its own lock"
    # Nobody could return the stream while the lock was held; the next
    # acquire that finds no idle stream does.
    with pool.acquire_compute(blocking=False) as lease:
        assert lease.stream is pool._streams[0]
    assert pool.stats().compute.leased == 0
    pool.close()


@pytest.mark.parametrize("waiting_for", ["stream", "key"])
def test_a_lease_collected_inside_a_critical_section_goes_to_the_thread_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch, waiting_for: str
) -> None:
    """The collection runs inside one of the pool's critical sections (here
    ``pool.stats()``), so the dropped lease's finalizer cannot take the lock, while
    another thread waits for that lease's stream (or its key). The stream must reach
    the waiter when the critical section ends: nobody else may ever come to return it."""
    pool = CudaStreamPool(1, 1, 0, backend="host")
    key = "k" if waiting_for == "key" else None
    cycle: list[Any] = [pool.acquire_compute(affinity_key=key)]
    cycle.append(cycle)
    got: list[bool] = []

    def wait_for_it() -> None:
        with contextlib.suppress(PoolTimeoutError), pool.acquire_compute(key, timeout=10):
            got.append(True)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    wait_until(lambda: pool.stats().compute.waiting == 1, timeout=10, what="the thread waits")
    held_events = AffinityTable.held_events

    def collecting(table: AffinityTable) -> int:
        gc.collect()  # as if an allocation in the critical section set the collector off
        return held_events(table)

    monkeypatch.setattr(AffinityTable, "held_events", collecting)
    with no_collection_here(), pytest.warns(ResourceWarning, match="dropped without release"):
        del cycle
        pool.stats()
        monkeypatch.undo()
        waiter.join(30)
    assert got == [True], "the waiter never got the stream of the lease collected under the lock"
    pool.close()


def test_a_pool_collected_by_a_host_function_of_its_own_stream_is_closed() -> None:
    """A collection inside a host function runs on the stream's worker, a thread of
    the library, and may run the finalizer of the pool that stream belongs to:
    destroying the stream must not wait for the very thread that destroys it."""
    pool = CudaStreamPool(1, 0, 0, backend="host")
    events, worker = pool.events, pool._streams[0]._handle._worker
    lease = pool.acquire_compute()
    collected = threading.Event()

    def collect() -> None:
        gc.collect()
        collected.set()

    cycle: list[Any] = [pool]
    cycle.append(cycle)
    with no_collection_here():
        del pool, cycle
        lease.launch_host_func(collect)
        assert collected.wait(10), "the pool's finalizer waits for the stream that runs it"
    assert events._closed_reason is not None
    worker.join(10)
    assert not worker.is_alive()
    lease.release()  # a no-op: its pool was closed


def test_a_lease_and_its_pool_collected_together(destroyed_on: list[str]) -> None:
    pool = CudaStreamPool(1, 0, 0, backend="host")
    lease = pool.acquire_compute()
    worker = pool._streams[0]._handle._worker
    events = pool.events
    cycle: list[Any] = [lease, pool]
    cycle.append(cycle)
    with no_collection_here():
        del lease, pool, cycle
        collector = _collect_on_another_thread()
        # The pool's finalizer closed it; the lease, collected with it, had
        # nothing left to return.
        assert events._closed_reason is not None
    assert destroyed_on == [collector]
    worker.join(10)
    assert not worker.is_alive()


def test_a_warning_made_an_error_does_not_keep_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: unraisable.append(info.exc_value))
    pool = CudaStreamPool(2, 0, 0, backend="host")
    lease = pool.acquire_compute()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del lease
    assert [type(error) for error in unraisable] == [ResourceWarning]
    assert pool.stats().compute.leased == 0
    pool.close()


def test_a_pool_dropped_while_its_thread_holds_the_event_lock_does_not_deadlock(
    destroyed_on: list[str],
) -> None:
    """A collection can run a dropped pool's finalizer inside one of the event
    pool's critical sections, on the thread that holds its lock. The finalizer
    must not wait for that lock for ever: it marks the event pool closed and
    leaves the idle events to be freed with it."""
    outcome: list[str] = []

    def drop_while_holding_the_lock() -> None:
        pool = CudaStreamPool(2, 1, 0, backend="host")
        events = pool.events
        pool.events.acquire().release()  # an idle event the close would free
        events._lock.acquire()
        try:
            del pool  # the finalizer runs here, on this thread, under the lock
        finally:
            events._lock.release()
        try:
            events.acquire()
        except PoolClosedError:
            outcome.append("closed")

    thread = threading.Thread(target=drop_while_holding_the_lock, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the finalizer waited for a lock its own thread held"
    assert outcome == ["closed"]
    assert len(destroyed_on) == 3, "the pool's streams were destroyed all the same"


def test_a_host_function_thread_closed_by_a_finalizer_waits_a_bounded_time() -> None:
    from cupystreams._backends._callbacks import CallbackThread

    ran = threading.Event()
    callbacks = CallbackThread(lambda event: None, name="test-callbacks")
    callbacks.launch(0, None, lambda error: ran.set())
    assert ran.wait(5)
    callbacks._changed.acquire()  # as a collection inside a critical section would find it
    try:
        started = time.monotonic()
        callbacks.close(lock_wait=0.05)
        assert time.monotonic() - started < 2
    finally:
        callbacks._changed.release()
    with pytest.raises(PoolClosedError):
        callbacks.launch(0, None, lambda error: None)  # closed all the same
    callbacks.close()  # a later close still stops the thread
    assert callbacks._thread is None
