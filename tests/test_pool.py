"""The pool's semantics (docs/semantics.md), on the host backend and (marked gpu) on CuPy."""

from __future__ import annotations

import gc
import random
import threading
import time
import warnings

import pytest

from cupystreams import (
    BackendUnavailableError,
    CudaStreamPool,
    EventPool,
    LeaseError,
    PoolClosedError,
    PoolExhaustedError,
    PoolTimeoutError,
    StreamPriority,
    StreamState,
    comm_stream,
    compute_stream,
    get_global_stream_pool,
    high_priority_stream,
    reset_global_pool,
)


def test_leases_are_exclusive_and_counted(pool: CudaStreamPool) -> None:
    a, b = pool.acquire_compute(), pool.acquire_compute()
    assert a.stream is not b.stream
    assert a.stream.state is StreamState.LEASED
    with pytest.raises(PoolExhaustedError, match="compute"):
        pool.acquire_compute(blocking=False)
    stats = pool.stats()
    assert (stats.compute.leased, stats.compute.idle, stats.exhaustions) == (2, 0, 1)
    a.release()
    b.release()
    assert pool.stats().compute.leased == 0
    assert pool.stats().acquisitions == 2


def test_lease_is_one_shot(pool: CudaStreamPool) -> None:
    lease = pool.acquire_comm()
    stream = lease.stream
    lease.release()
    assert lease.released
    assert stream.state is StreamState.IDLE
    with pytest.raises(LeaseError, match="already released"):
        lease.release()
    with pytest.raises(LeaseError):
        pool.release(lease)
    for use in (lease.query, lease.synchronize, lease.record_event):
        with pytest.raises(LeaseError):
            use()
    with pytest.raises(LeaseError):
        lease.wait(0)


def test_release_to_another_pool_raises(pool: CudaStreamPool, backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend) as other:
        lease = other.acquire_compute()
        with pytest.raises(LeaseError, match="another pool"):
            pool.release(lease)
        assert not lease.released
        lease.release()
    with pytest.raises(TypeError, match="lease="):
        pool.release("not a lease")  # type: ignore[arg-type]


def test_with_block_releases_on_error(pool: CudaStreamPool) -> None:
    with pytest.raises(RuntimeError, match="boom"), pool.acquire_high_priority() as lease:
        raise RuntimeError("boom")
    assert lease.released
    assert pool.stats().high_priority.leased == 0


def test_blocking_acquire_is_first_come_first_served(backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        holder = pool.acquire_compute()
        order: list[int] = []
        started: list[threading.Event] = []

        def wait_turn(i: int) -> None:
            with pool.acquire_compute(timeout=10):
                order.append(i)

        threads = []
        for i in range(4):
            t = threading.Thread(target=wait_turn, args=(i,))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while pool.stats().compute.waiting < i + 1 and time.monotonic() < deadline:
                time.sleep(0.001)  # queue them one at a time, in a known order
        started.clear()
        assert pool.stats().compute.waiting == 4
        holder.release()
        for t in threads:
            t.join(10)
        assert order == [0, 1, 2, 3]


def test_timeout_raises_and_leaves_the_queue(backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        holder = pool.acquire_compute()
        start = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            pool.acquire_compute(timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - start >= 0.05
        stats = pool.stats()
        assert (stats.compute.waiting, stats.timeouts) == (0, 1)
        holder.release()
        pool.acquire_compute(timeout=0).release()


def test_dropped_lease_returns_with_resource_warning(pool: CudaStreamPool) -> None:
    lease = pool.acquire_compute()
    with pytest.warns(ResourceWarning, match="without release"):
        del lease
        gc.collect()
    assert pool.stats().compute.leased == 0


def test_affinity_prefers_the_keys_stream(pool: CudaStreamPool) -> None:
    with pool.acquire_compute(affinity_key="k") as first:
        stream = first.stream
    with pool.acquire_compute(affinity_key="k") as second:
        assert second.stream is stream
    assert stream.stats.affinity_hits == 1


def test_same_thread_same_key_raises_instead_of_deadlocking(pool: CudaStreamPool) -> None:
    with pool.acquire_compute(affinity_key="k"):
        with pytest.raises(LeaseError, match="already holds"):
            pool.acquire_compute(affinity_key="k")
        assert pool.stats().compute.leased == 1


def test_second_lease_of_a_key_waits_for_the_first(pool: CudaStreamPool) -> None:
    first = pool.acquire_compute(affinity_key="k")
    got: list[float] = []

    def second() -> None:
        with pool.acquire_compute(affinity_key="k", timeout=5):
            got.append(time.monotonic())

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.05)
    assert not got, "a second live lease for one key"
    released_at = time.monotonic()
    first.release()
    t.join(5)
    assert got and got[0] >= released_at


def test_moved_key_waits_for_its_earlier_work_host() -> None:
    # The key's stream is busy with someone else's lease, so the key moves; the
    # new stream must still run after the key's earlier (slow) work.
    with CudaStreamPool(2, 0, 0, backend="host") as pool:
        log: list[str] = []
        with pool.acquire_compute(affinity_key="k") as first:
            first.launch_host_func(lambda: (time.sleep(0.1), log.append("first")))
            keyed_stream = first.stream
        other = pool.acquire_compute()
        assert other.stream is not keyed_stream  # kept for the key while another is idle
        blocker = pool.acquire_compute()
        assert blocker.stream is keyed_stream  # none other idle: the key's stream goes
        other.release()
        with pool.acquire_compute(affinity_key="k") as second:
            moved_to = second.stream
            assert moved_to is not keyed_stream
            second.launch_host_func(lambda: log.append("second"))
        blocker.release()
        pool.sync_all()
        assert log == ["first", "second"]
        assert moved_to.stats.waits == 1


def test_key_table_is_bounded(backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend, max_affinity_keys=4) as pool:
        for key in range(10):
            pool.acquire_compute(affinity_key=key).release()
        assert len(pool._core.keys) == 4
        # Each key moved off the one stream's previous key: three remembered
        # keys hold the end of their work; the last one's stream is still its own.
        assert pool.stats().key_events == 3
        assert pool.events.stats().in_use == 3


def test_priorities_come_from_the_device(backend: str) -> None:
    with CudaStreamPool(1, 1, 1, backend=backend) as pool:
        least, greatest = pool.priority_range
        assert greatest <= least
        by_kind = {s.kind: s.priority for s in pool.stream_stats()}
        assert by_kind == {"compute": least, "comm": least, "high_priority": greatest}
    with CudaStreamPool(0, 0, 1, backend=backend, high_priority=StreamPriority.NORMAL) as pool:
        assert pool.stream_stats()[0].priority == least
    with pytest.raises(ValueError, match=r"high_priority=-99 is out of range"):
        CudaStreamPool(0, 0, 1, backend=backend, high_priority=-99)


def test_stats_are_frozen_snapshots(pool: CudaStreamPool) -> None:
    before = pool.stats()
    with pool.acquire_compute() as lease:
        time.sleep(0.01)
        during = lease.stream.stats
    after = pool.stats()
    assert before.compute.leased == 0 and after.compute.leased == 0
    assert after.acquisitions == before.acquisitions + 1
    assert during.acquisitions == 1
    with pytest.raises(AttributeError):
        before.timeouts = 3  # type: ignore[misc]
    stream_stats = [s for s in pool.stream_stats() if s.acquisitions]
    assert stream_stats[0].avg_active_time_ms() >= 10.0


def test_close_is_idempotent_and_wakes_waiters(backend: str) -> None:
    pool = CudaStreamPool(1, 0, 0, backend=backend)
    holder = pool.acquire_compute()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire_compute(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    while pool.stats().compute.waiting == 0:
        time.sleep(0.001)
    start = time.monotonic()
    pool.close()
    t.join(5)
    assert time.monotonic() - start < 2
    assert len(errors) == 1 and isinstance(errors[0], PoolClosedError)
    pool.close()
    assert pool.closed
    with pytest.raises(PoolClosedError):
        holder.query()
    holder.release()  # a no-op once the pool is closed
    with pytest.raises(PoolClosedError, match="closed"):
        pool.acquire_compute()
    assert "closed" in repr(pool)


def test_host_function_errors_surface_at_synchronize(pool: CudaStreamPool) -> None:
    ran: list[int] = []
    with pool.acquire_compute() as lease:
        lease.launch_host_func(lambda: 1 / 0)  # type: ignore[func-returns-value]
        lease.launch_host_func(lambda: ran.append(1))
        with pytest.raises(ZeroDivisionError):
            lease.synchronize()
        lease.synchronize()  # reported once
    assert ran == [1]


def test_a_host_function_error_stays_with_its_lease(backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        with pool.acquire_compute() as first:
            first.launch_host_func(lambda: 1 / 0)  # type: ignore[func-returns-value]
        with pool.acquire_compute() as second:
            assert second.stream is pool._streams[0]
            second.synchronize()  # not the first lease's error
        with pytest.raises(ZeroDivisionError):
            pool.sync_all()  # reported once, pool-wide
        pool.sync_all()


def test_wait_rejects_foreign_objects(pool: CudaStreamPool) -> None:
    with pool.acquire_compute() as lease:
        for bad in ("stream", 1.5, object(), True):
            with pytest.raises(TypeError, match="other="):
                lease.wait(bad)
        with pytest.raises(ValueError, match="not a valid stream pointer"):
            lease.wait(-1)


def test_bad_constructor_arguments() -> None:
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"compute_streams": -1}, ValueError, "compute_streams=-1"),
        ({"comm_streams": 1.5}, TypeError, "comm_streams"),
        (
            {"compute_streams": 0, "comm_streams": 0, "high_priority_streams": 0},
            ValueError,
            "at least one stream",
        ),
        ({"backend": "opencl"}, ValueError, "backend='opencl'"),
        ({"event_pool_size": -2}, ValueError, "event_pool_size"),
        ({"enable_affinity": "yes"}, TypeError, "enable_affinity"),
        ({"high_priority": "max"}, TypeError, "high_priority"),
        ({"max_affinity_keys": 0}, ValueError, "max_affinity_keys"),
    ]
    for kwargs, error, message in cases:
        kwargs.setdefault("backend", "host")
        with pytest.raises(error, match=message):
            CudaStreamPool(**kwargs)  # type: ignore[arg-type]


def test_bad_acquire_arguments_change_nothing(pool: CudaStreamPool) -> None:
    before = pool.stats()
    with pytest.raises(ValueError, match="timeout=-1"):
        pool.acquire_compute(timeout=-1)
    with pytest.raises(ValueError, match="timeout=nan"):
        pool.acquire_comm(timeout=float("nan"))
    with pytest.raises(TypeError, match="blocking="):
        pool.acquire_compute(blocking="no", timeout=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="affinity_key="):
        pool.acquire_compute(affinity_key=[1])
    assert pool.stats() == before


def test_acquiring_a_kind_the_pool_lacks(backend: str) -> None:
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        with pytest.raises(ValueError, match="comm_streams=N"):
            pool.acquire_comm()
        with pytest.raises(ValueError, match="high_priority_streams=N"):
            pool.acquire_high_priority()


def test_auto_backend_never_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUPYSTREAMS_BACKEND", raising=False)
    from conftest import GPU_COUNT

    if GPU_COUNT:
        with CudaStreamPool() as pool:
            assert pool.backend == "cupy"
    else:
        with pytest.raises(BackendUnavailableError, match="backend='host'"):
            CudaStreamPool()
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "host")
    with CudaStreamPool() as pool:
        assert pool.backend == "host"
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "vulkan")
    with pytest.raises(ValueError, match="CUPYSTREAMS_BACKEND='vulkan'"):
        CudaStreamPool()


def test_event_pool(backend: str) -> None:
    events = EventPool(initial_size=2, max_size=3, timing=True, backend=backend)
    assert events.stats().created == 2
    held = [events.acquire() for _ in range(5)]
    assert events.stats().in_use == 5
    for event in held:
        event.release()
    stats = events.stats()
    assert (stats.idle, stats.in_use, stats.created) == (3, 0, 5)
    with pytest.raises(LeaseError, match="already released"):
        events.release(held[0])
    with pytest.raises(LeaseError):
        held[0].query()
    with pytest.raises(ValueError, match="initial_size=5 exceeds max_size=1"):
        EventPool(initial_size=5, max_size=1, backend=backend)


def test_elapsed_time_needs_timing_events(pool: CudaStreamPool, backend: str) -> None:
    with pool.acquire_compute() as lease:
        start, end = lease.record_event(), lease.record_event()
        with pytest.raises(ValueError, match="timing"):
            start.elapsed_time(end)
        start.release()
        end.release()
    timed = EventPool(timing=True, backend=backend)
    with pool.acquire_compute() as lease:
        start, end = timed.acquire(), timed.acquire()
        start.record(lease)
        if backend == "cupy":
            import gpu_helpers

            gpu_helpers.spin(lease, 20)  # host functions do not hold up a CUDA stream
        else:
            lease.launch_host_func(lambda: time.sleep(0.02))
        end.record(lease)
        end.synchronize()
        assert start.elapsed_time(end) >= 15.0


def test_too_many_streams_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupystreams import _pool

    class Queues:
        """A backend stand-in reporting 2 hardware queues."""

    monkeypatch.setattr(_pool, "_queue_warning_given", False)
    pool = CudaStreamPool(1, 0, 0, backend="host")
    monkeypatch.setattr(pool._backend, "hardware_queues", lambda: 2)
    with pytest.warns(RuntimeWarning, match="CUDA_DEVICE_MAX_CONNECTIONS"):
        _pool._warn_if_over_hardware_queues(pool._backend, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _pool._warn_if_over_hardware_queues(pool._backend, 3)
    pool.close()


def test_global_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "host")
    reset_global_pool()
    pools: list[CudaStreamPool] = []
    threads = [
        threading.Thread(target=lambda: pools.append(get_global_stream_pool())) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in pools}) == 1
    with compute_stream("k") as a, comm_stream() as b, high_priority_stream() as c:
        assert {a.stream.kind.value, b.stream.kind.value, c.stream.kind.value} == {
            "compute",
            "comm",
            "high_priority",
        }
    with pytest.raises(ValueError, match="reset_global_pool"):
        get_global_stream_pool(compute_streams=8)
    reset_global_pool()
    assert pools[0].closed
    assert get_global_stream_pool(compute_streams=8).stats().compute.capacity == 8
    with compute_stream() as lease:  # the helpers use the pool whatever its sizes
        assert lease.stream._core is get_global_stream_pool(compute_streams=8)._core


def test_fork_child_sees_a_closed_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing as mp

    monkeypatch.setenv("CUPYSTREAMS_BACKEND", "host")
    pool = CudaStreamPool(1, 0, 0)
    lease = pool.acquire_compute()
    context = mp.get_context("fork")
    queue = context.SimpleQueue()
    child = context.Process(target=_child_after_fork, args=(pool, queue))
    child.start()
    child.join(30)
    assert queue.get() == ("PoolClosedError", True, True)
    lease.release()
    pool.close()


def _child_after_fork(pool: CudaStreamPool, queue: object) -> None:
    try:
        pool.acquire_compute()
        result: tuple[str, bool, bool] = ("no error", False, False)
    except PoolClosedError as exc:
        fresh = get_global_stream_pool()
        result = (type(exc).__name__, "fork" in str(exc), not fresh.closed)
    queue.put(result)  # type: ignore[attr-defined]


def test_a_held_key_does_not_stop_the_table_from_forgetting_others(backend: str) -> None:
    with CudaStreamPool(2, 0, 0, backend=backend, max_affinity_keys=2) as pool:
        held = pool.acquire_compute(affinity_key="held")
        for key in range(50):
            pool.acquire_compute(affinity_key=key).release()
        assert len(pool._core.keys) == 2
        # A forgotten key gives its end-of-work event back; the last key's
        # stream is still its own, so its end is not recorded yet.
        assert pool.events.stats().in_use == 0
        held.release()


def test_a_released_event_stays_dead_when_its_cuda_event_is_reused(backend: str) -> None:
    events = EventPool(initial_size=1, max_size=1, backend=backend)
    first = events.acquire()
    first.release()
    second = events.acquire()  # the same CUDA event, in a new handle
    with pytest.raises(LeaseError, match="already released"):
        first.release()
    with pytest.raises(LeaseError):
        first.query()
    assert second.query()
    second.release()


def test_a_key_keeps_its_stream_while_another_is_idle(backend: str) -> None:
    """Lease key "a", release; hold a lease with key "b"; lease "a" again: it gets its
    own stream back (an affinity hit), because "b" took another idle stream."""
    with CudaStreamPool(4, 0, 0, backend=backend) as pool:
        with pool.acquire_compute(affinity_key="a") as first:
            a_stream = first.stream
        with pool.acquire_compute(affinity_key="b") as b:
            assert b.stream is not a_stream
            with pool.acquire_compute(affinity_key="a") as again:
                assert again.stream is a_stream
        assert a_stream.stats.affinity_hits == 1
        assert pool.stats().key_events == 0  # no key's stream changed hands


def test_every_keyed_acquire_after_the_first_is_a_hit_without_contention(backend: str) -> None:
    """With no more keys than streams and nobody waiting, keys never move (plain
    leases in between take a key's stream only when no other is idle)."""
    rng = random.Random(7)
    keys = ["a", "b", "c", "d"]
    with CudaStreamPool(4, 0, 0, backend=backend) as pool:
        keyed = 0
        for _ in range(200):
            key = rng.choice([*keys, None])
            with pool.acquire_compute(affinity_key=key):
                keyed += key is not None
        stats = pool.stream_stats()
        first_leases = len({k for k in keys})
        assert sum(s.affinity_hits for s in stats) == keyed - first_leases
        assert sum(s.waits for s in stats) == 0, "a key moved although its stream was idle"


def test_the_host_backend_has_a_legacy_default_stream() -> None:
    """The tour's calls that name the current or the legacy default stream run
    unchanged on the host backend."""
    with CudaStreamPool(2, 0, 0, backend="host") as pool:
        outside = pool.record_event(None)  # no lease entered: the legacy stream
        outside.synchronize()
        assert outside.query()
        outside.release()
        zero = pool.record_event(0)
        zero.synchronize()
        zero.release()
        gate = threading.Event()
        with pool.acquire_compute() as lease:
            lease.wait(0)  # orders after the legacy stream's work: none is queued
            lease.launch_host_func(gate.wait)
            inside = pool.record_event(None)  # the entered lease's stream
            assert not inside.query(), "recorded on another stream than the current one"
            gate.set()
            inside.synchronize()
            assert inside.query()
            inside.release()
        with pytest.raises(TypeError, match="legacy default stream 0"):
            pool.record_event(7)


@pytest.mark.parametrize("kind", ["compute", "comm", "high_priority"])
def test_a_key_orders_its_leases_on_every_kind(kind: str) -> None:
    """A key works alike on every kind: it keeps its stream while another is idle,
    and when it must move, its new stream waits for the key's earlier work."""
    with CudaStreamPool(2, 2, 2, backend="host") as pool:
        acquire = getattr(pool, f"acquire_{kind}")
        log: list[str] = []
        with acquire(affinity_key="k") as first:
            first.launch_host_func(lambda: (time.sleep(0.1), log.append("first")))
            keyed_stream = first.stream
        with acquire(affinity_key="k") as again:
            assert again.stream is keyed_stream  # kept for the key: an affinity hit
        other = acquire()
        assert other.stream is not keyed_stream
        blocker = acquire()
        assert blocker.stream is keyed_stream  # no other idle stream: the key's goes
        other.release()
        with acquire(affinity_key="k") as moved:
            assert moved.stream is not keyed_stream
            moved.launch_host_func(lambda: log.append("moved"))
            moved_to = moved.stream
        blocker.release()
        pool.sync_all()
        assert log == ["first", "moved"]
        assert (keyed_stream.stats.affinity_hits, moved_to.stats.waits) == (1, 1)
        assert all(s.kind == kind for s in (keyed_stream.stats, moved_to.stats))


def test_a_second_high_priority_lease_of_a_key_waits_for_the_first() -> None:
    with CudaStreamPool(1, 0, 2, backend="host") as pool:
        first = pool.acquire_high_priority(affinity_key="k")
        with pytest.raises(LeaseError, match="already holds"):
            pool.acquire_high_priority(affinity_key="k")
        got: list[float] = []

        def second() -> None:
            with pool.high_priority_context("k"):
                got.append(time.monotonic())

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.05)
        assert not got and pool.stats().high_priority.waiting == 1
        released_at = time.monotonic()
        first.release()
        t.join(5)
        assert got and got[0] >= released_at


@pytest.mark.parametrize("max_size", [0, 1])
def test_an_event_pool_may_keep_no_idle_events(backend: str, max_size: int) -> None:
    events = EventPool(max_size=max_size, backend=backend)
    assert (events.stats().created, events.stats().idle) == (max_size, max_size)
    held = [events.acquire() for _ in range(3)]
    assert events.stats().in_use == 3
    for event in held:
        event.release()
    stats = events.stats()
    assert (stats.idle, stats.in_use, stats.max_size) == (max_size, 0, max_size)


def test_a_pool_with_event_pool_size_0_orders_moved_keys(backend: str) -> None:
    """event_pool_size=0 keeps no idle event; keys still record and wait on events."""
    with CudaStreamPool(2, 0, 0, event_pool_size=0, backend=backend) as pool:
        with pool.acquire_compute(affinity_key="a"):
            pass
        with pool.acquire_compute() as x, pool.acquire_compute() as y:
            x.wait(y)  # a temporary event, freed on return
        assert pool.stats().key_events == 1  # "a"'s stream changed hands
        with pool.acquire_compute(affinity_key="a"):
            pass
        stats = pool.stats()
        assert (stats.key_events, stats.events.in_use, stats.events.idle) == (0, 0, 0)


def test_events_in_use_are_the_keys_once_users_released_theirs(backend: str) -> None:
    """After every lease and every user's event is released, the events still in
    use are those the pool holds for affinity keys (``PoolStats.key_events``)."""
    rng = random.Random(3)
    with CudaStreamPool(3, 1, 1, event_pool_size=4, backend=backend) as pool:
        for _ in range(300):
            kind = rng.choice(["compute", "comm", "high_priority"])
            key = rng.choice([None, "a", "b", "c", "d", "e"])
            acquire = getattr(pool, f"acquire_{kind}")
            held = [acquire(affinity_key=key)]
            if rng.random() < 0.5:  # a second lease of the kind takes another stream
                extra = acquire(blocking=False) if kind == "compute" else None
                held += [extra] if extra is not None else []
            if rng.random() < 0.3:
                event = held[0].record_event()
                held[-1].wait(event)
                event.release()
            for lease in reversed(held):
                lease.release()
            stats = pool.stats()
            assert stats.leased == 0
            assert stats.events.in_use == stats.key_events, stats
        assert pool.stats().key_events > 0  # the run did move keys
