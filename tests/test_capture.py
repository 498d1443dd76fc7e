"""pool.capture(): leases join a graph capture and join back, on every backend.

The rules need no device: they run on the host backend, whose streams are
captured by CUDA's rules (tasks recorded, not run; a replay runs them in
recorded order), and, marked gpu, on CuPy. The GPU tests of what a replay
computes, with CuPy and torch, are in test_capture_gpu.py.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from reliability_helpers import no_leaks, wait_until

from cupystreams import (
    CapturedGraph,
    CudaStreamPool,
    EventPool,
    LeaseError,
    PoolError,
    PoolExhaustedError,
    StreamLease,
)
from cupystreams._backends import _host
from cupystreams._backends._host import HostBackend, HostEvent

SLOW_S = 0.05  # a deliberately slow producer: a missing join shows as wrong data


@pytest.fixture
def host_pool() -> Iterator[CudaStreamPool]:
    with no_leaks(), CudaStreamPool(2, 1, 1, backend="host") as pool:
        yield pool


def step(pool: CudaStreamPool, origin: StreamLease, data: dict[str, Any], explicit: bool) -> None:
    """One step on the host backend: the origin's slow write, two side leases that
    read it, and the origin reading their results. ``explicit`` adds the waits a
    step needs outside a capture; inside one, the pool's joins must do that work."""

    def slow_write() -> None:
        time.sleep(SLOW_S)
        data["x"] = data["src"]

    origin.launch_host_func(slow_write)
    for name, fn in (("a", lambda x: x * 2), ("b", lambda x: x + 3)):
        with pool.acquire_compute() as side:
            if explicit:
                side.wait(origin)

            def slow_side(name: str = name, fn: Callable[[int], int] = fn) -> None:
                time.sleep(SLOW_S)
                data[name] = fn(data["x"])

            side.launch_host_func(slow_side)
            if explicit:
                origin.wait(side)
    origin.launch_host_func(lambda: data.update(out=data["a"] + data["b"]))


def test_a_replay_computes_what_the_eager_step_computes(host_pool: CudaStreamPool) -> None:
    data: dict[str, Any] = {"src": 1}
    with host_pool.acquire_comm() as origin:
        step(host_pool, origin, data, explicit=True)
        origin.synchronize()
        assert data["out"] == 1 * 2 + 1 + 3
        recorded: dict[str, Any] = {"src": 5}
        with host_pool.capture(origin) as graph:
            step(host_pool, origin, recorded, explicit=False)
        assert isinstance(graph, CapturedGraph)
        time.sleep(2 * SLOW_S)
        assert recorded == {"src": 5}, "captured work ran during the capture"
        for src in (5, 7):
            recorded["src"] = src
            graph.launch(origin)
            origin.synchronize()
            assert recorded["out"] == src * 2 + src + 3
        graph.close()
    assert host_pool.stats().compute.leased == 0


def test_a_graph_replays_on_any_stream_in_recorded_order(host_pool: CudaStreamPool) -> None:
    order: list[str] = []
    with host_pool.acquire_comm() as origin:
        with host_pool.capture(origin) as graph:
            origin.launch_host_func(lambda: order.append("origin first"))
            with host_pool.acquire_compute() as side:
                side.launch_host_func(lambda: (time.sleep(SLOW_S), order.append("side")))
            origin.launch_host_func(lambda: order.append("origin last"))
        assert graph is not None
        with graph:
            with host_pool.acquire_high_priority() as other:
                graph.launch(other)
                other.synchronize()
            graph.launch(0)  # the legacy default stream
            host_pool.record_event(0).synchronize()
            with host_pool.acquire_compute() as current:
                graph.launch()  # the current stream: a lease makes itself current
                current.synchronize()
        assert graph.closed
        with pytest.raises(PoolError, match="closed"):
            graph.launch(origin)
    assert order == ["origin first", "side", "origin last"] * 3


def test_a_loop_of_leases_reuses_the_streams_parked_with_the_capture(pool: CudaStreamPool) -> None:
    """A stream joined to a capture stays capturing after its lease ends: it is kept
    from other users, serves this thread's next lease, and comes back at the end."""
    with pool.acquire_comm() as origin, pool.capture(origin):
        for _ in range(10):
            with pool.acquire_compute() as lease:
                assert type(lease) is not StreamLease  # joined
        first = pool.acquire_compute()
        with pool.acquire_compute():
            pass
        first.release()
        assert pool.stats().compute.leased == 2, "parked streams must not be idle"
        acquired_during = pool.stats().acquisitions
    assert acquired_during == 1 + 12  # the origin, then every lease of the loop counted
    stats = pool.stats()
    assert (stats.compute.leased, stats.compute.idle) == (0, 2)


def test_other_threads_do_not_join_and_never_get_a_parked_stream(
    pool: CudaStreamPool, backend: str
) -> None:
    ran = threading.Event()
    with pool.acquire_comm() as origin, pool.capture(origin):
        with pool.acquire_compute():
            pass  # its stream is parked: the pool has one compute stream left
        seen: list[object] = []

        def other_thread() -> None:
            with pool.acquire_compute(blocking=False) as lease:
                seen.append(type(lease))
                if backend == "host":
                    lease.launch_host_func(ran.set)
                    lease.synchronize()  # runs now: this lease is not captured
                with pytest.raises(PoolExhaustedError):
                    pool.acquire_compute(blocking=False)  # the parked stream is not idle

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert seen == [StreamLease]
        assert ran.is_set() or backend != "host"


def test_two_threads_capture_on_one_pool_at_once() -> None:
    """Each thread's leases join its own capture, and each graph replays its own work."""
    with no_leaks(), CudaStreamPool(2, 2, 0, backend="host") as pool:
        both = threading.Barrier(2)
        done: dict[str, list[str]] = {}

        def capture(name: str) -> None:
            ran: list[str] = []
            with pool.acquire_comm() as origin:
                with pool.capture(origin) as graph:
                    both.wait()  # the two captures overlap
                    for step in range(3):
                        with pool.acquire_compute() as side:
                            side.launch_host_func(lambda step=step: ran.append(f"{name}{step}"))
                    both.wait()
                assert graph is not None
                with graph:
                    graph.launch(origin)
                    origin.synchronize()
            done[name] = ran

        workers = [threading.Thread(target=capture, args=(name,)) for name in "ab"]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(10)
        assert done == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
        assert pool.stats().compute.leased == 0


def test_a_lease_left_joined_is_named_and_the_pool_stays_usable(pool: CudaStreamPool) -> None:
    with pool.acquire_comm() as origin:
        with pytest.raises(LeaseError) as info, pool.capture(origin) as graph:
            left, line = pool.acquire_compute(), sys._getframe().f_lineno
            with pool.acquire_compute():
                pass
        message = str(info.value)
        assert f"{__file__}:{line}" in message and repr(left.stream) in message, message
        assert "1 lease(s) still joined" in message
        assert graph is not None and graph.closed
        with pytest.raises(PoolError, match="capture failed"):
            graph.launch(origin)
        # A plain lease now, its stream out of the capture: usable, then released.
        assert type(left) is StreamLease
        left.wait(origin)
        left.synchronize()
        left.release()
        assert pool.stats().compute.leased == 0
        with pool.capture(origin) as again, pool.acquire_compute():
            pass
        assert again is not None and not again.closed
        again.close()
    pool.sync_all()


def test_a_failing_block_ends_the_capture_and_keeps_no_graph(pool: CudaStreamPool) -> None:
    with pool.acquire_comm() as origin:
        with (
            pytest.raises(ZeroDivisionError),
            pool.capture(origin) as graph,
            pool.acquire_compute(),
        ):
            1 / 0  # noqa: B018
        assert graph is not None
        with pytest.raises(PoolError, match="its with block raised"):
            graph.launch(origin)
        assert not pool._backend.is_capturing(origin.cupy_stream)
    stats = pool.stats()
    assert (stats.compute.leased, stats.comm.leased) == (0, 0)


def test_no_stream_or_event_is_created_during_a_capture(
    pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joins, join-backs, waits, recorded events and a key's lazily recorded end
    all take idle events during a capture; nothing is created."""
    backend = pool._backend
    with pool.acquire_compute(affinity_key="k"):
        pass  # the key's end is recorded when its stream changes hands: in the capture
    origin = pool.acquire_comm()
    created: list[str] = []
    for what in ("create_stream", "create_event"):
        make = getattr(backend, what)

        def counted(*args: Any, what: str = what, make: Any = make) -> Any:
            created.append(what)
            return make(*args)

        monkeypatch.setattr(backend, what, counted)
    with pool.capture(origin):
        created.clear()  # events made before the capture began are fine
        for _ in range(3):
            with pool.acquire_compute() as a, pool.acquire_compute() as b:
                b.wait(a)
                event = a.record_event()
                b.wait(event)
                event.release()
                origin.wait(b)
        with pytest.raises(PoolError, match="creating a CudaStreamPool"):
            CudaStreamPool(1, 0, 0, backend=pool.backend)
        assert created == []
    origin.release()
    stats = pool.stats()
    assert stats.events.in_use == stats.key_events == 1  # the key's end, recorded in the capture


def test_no_idle_event_is_an_error_naming_event_pool_size_not_a_broken_capture(
    backend: str,
) -> None:
    with CudaStreamPool(2, 1, 0, event_pool_size=0, backend=backend) as pool:
        with pool.acquire_comm() as origin, pool.capture(origin) as graph:
            with pytest.raises(PoolExhaustedError, match="event_pool_size"):
                pool.acquire_compute()
            assert pool.stats().compute.leased == 0, "the lease that could not join went back"
        assert graph is not None and not graph.closed
        graph.close()


def test_pools_and_events_are_neither_created_nor_closed_during_a_capture(
    host_pool: CudaStreamPool,
) -> None:
    other = CudaStreamPool(1, 0, 0, backend="host")
    with host_pool.acquire_comm() as origin:
        with host_pool.capture(origin):
            for call, name in (
                (lambda: CudaStreamPool(1, 0, 0, backend="host"), "create the pool before"),
                (lambda: EventPool(backend="host"), "create the EventPool before"),
                (other.close, "close it after"),
                (host_pool.close, "close it after"),
                (host_pool.sync_all, "sync_all"),
            ):
                with pytest.raises(PoolError, match=name):
                    call()
            with pytest.raises(RuntimeError, match="capturing a CUDA graph"):
                host_pool.trace().__enter__()
            EventPool(initial_size=0, backend="host")  # creates nothing: allowed
        host_pool.sync_all()
    other.close()


def test_capture_blocks_do_not_nest_and_a_traced_pool_does_not_capture(
    host_pool: CudaStreamPool,
) -> None:
    with host_pool.acquire_comm() as origin:
        nested = host_pool.capture(origin)
        with host_pool.capture(origin), pytest.raises(PoolError, match="do not nest"), nested:
            pass
        with host_pool.trace(), pytest.raises(PoolError, match="being traced"):
            host_pool.capture(origin).__enter__()
        block = host_pool.capture(origin)
        with block:
            pass
        with pytest.raises(PoolError, match="entered once"), block:
            pass


def test_a_second_pool_joins_a_capture_it_did_not_begin() -> None:
    """Another pool's capture on the same origin is a capture begun elsewhere (as
    torch's is): the block yields None, its leases join and join back, and its
    parked streams return once the owner of the capture has ended it."""
    order: list[str] = []
    with no_leaks(), CudaStreamPool(1, 1, 0, backend="host") as a:
        b = CudaStreamPool(1, 0, 0, backend="host")
        with a.acquire_comm() as origin:
            with a.capture(origin) as graph:
                origin.launch_host_func(lambda: order.append("a"))
                with b.capture(origin) as none:
                    assert none is None
                    with b.acquire_compute() as lease:
                        lease.launch_host_func(lambda: (time.sleep(SLOW_S), order.append("b")))
                time.sleep(0.01)
                assert b.stats().compute.leased == 1, "returned while still capturing"
                origin.launch_host_func(lambda: order.append("a again"))
            wait_until(lambda: not b._captures.busy(), timeout=5, what="b's stream came back")
            assert b.stats().compute.leased == 0
            assert graph is not None
            graph.launch(origin)
            origin.synchronize()
        b.close()
    assert order == ["a", "b", "a again"]


def test_a_pool_that_captured_is_freed_where_it_is_dropped() -> None:
    """Nothing a capture leaves behind (the graph, the block) holds the pool."""
    pool = CudaStreamPool(1, 1, 0, backend="host")
    with pool.acquire_comm() as origin:
        with pool.capture(origin) as graph, pool.acquire_compute():
            pass
        assert graph is not None
        graph.close()
    collected = weakref.ref(pool)
    gc.disable()
    try:
        del pool
        assert collected() is None, "a reference cycle keeps a pool that captured"
    finally:
        gc.enable()


def test_a_capture_leaves_no_cycle_and_a_graph_dropped_unclosed_is_freed(
    host_pool: CudaStreamPool,
) -> None:
    """After its block, nothing but the user's references may hold the capture: its
    lease class must not keep it (and with it the graph, the origin and the pool's
    core) until the cycle collector runs."""
    with host_pool.acquire_comm() as origin:
        gc.disable()
        try:
            block = host_pool.capture(origin)
            with block as graph, host_pool.acquire_compute():
                pass
            assert graph is not None
            capture, dropped = weakref.ref(block), weakref.ref(graph)
            del block, graph
            assert capture() is None, "a reference cycle keeps the capture after its block"
            assert dropped() is None, "a graph dropped without close() waits for the collector"
        finally:
            gc.enable()


def test_a_lease_dropped_while_its_stream_is_captured_comes_back_after_the_capture(
    host_pool: CudaStreamPool,
) -> None:
    """A plain lease whose stream a capture pulled in (CUDA's cross-stream capture),
    dropped without release: its finalizer must not make the capturing stream idle,
    where a plain acquire would queue work into the graph, but return it once the
    capture has ended."""
    with host_pool.acquire_comm() as origin:
        outside = host_pool.acquire_high_priority()  # a plain lease, taken before the capture
        with host_pool.capture(origin) as graph, host_pool.acquire_compute() as joined:
            outside.wait(joined)  # its stream joins the capture
            joined.wait(outside)  # and is joined back through this lease
            with pytest.warns(ResourceWarning, match="dropped without release"):
                del outside
            assert host_pool.stats().high_priority.idle == 0, "a capturing stream went idle"
        assert graph is not None
        graph.close()
    stats = host_pool.stats().high_priority
    assert (stats.idle, stats.leased) == (1, 0), "the stream did not come back after the capture"


def test_affinity_keys_are_refused_inside_a_capture(pool: CudaStreamPool) -> None:
    with pool.acquire_comm() as origin, pool.capture(origin):
        before = pool.stats()
        for call in (
            lambda: pool.acquire_compute(affinity_key="k"),
            lambda: pool.acquire_comm("k"),
            lambda: pool.compute_context(affinity_key="k"),
        ):
            with pytest.raises(ValueError, match="affinity_key='k'"):
                call()
        with pytest.raises(ValueError, match="timeout"):
            pool.acquire_compute(timeout=-1)
        assert pool.stats() == before


def test_a_joined_lease_refuses_what_would_break_the_capture(pool: CudaStreamPool) -> None:
    outside = pool.acquire_high_priority()
    with pool.acquire_comm() as origin, pool.capture(origin):
        with pool.acquire_compute() as lease:
            assert "joined" in repr(lease)
            for call, what in ((lease.synchronize, "synchronized"), (lease.query, "queried")):
                with pytest.raises(LeaseError, match=what):
                    call()
            with pytest.raises(LeaseError, match="not part of any capture"):
                lease.wait(outside)
            lease.wait(origin)  # inside the capture: fine
        with pytest.raises(LeaseError, match="capturing"):
            origin.release()  # the origin itself is capturing
    outside.release()


def test_a_joined_lease_refuses_to_wait_on_another_threads_capture(pool: CudaStreamPool) -> None:
    """Work in another capture is outside this one too: CUDA would invalidate the
    capture on such a wait, so it is refused first, and the capture goes on."""
    elsewhere = CudaStreamPool(1, 1, 0, backend=pool.backend, device=pool.device)
    inside, done = threading.Event(), threading.Event()
    their_origin: list[StreamLease] = []

    def capture_elsewhere() -> None:
        with elsewhere.acquire_comm() as origin, elsewhere.capture(origin) as graph:
            their_origin.append(origin)
            inside.set()
            done.wait(5)
        if graph is not None:
            graph.close()

    thread = threading.Thread(target=capture_elsewhere)
    thread.start()
    try:
        assert inside.wait(5), "the other capture did not begin"
        with pool.acquire_comm() as origin:
            with pool.capture(origin) as graph, pool.acquire_compute() as lease:
                with pytest.raises(LeaseError, match="another"):
                    lease.wait(their_origin[0])
                lease.wait(origin)  # inside this capture: fine
            assert graph is not None, "the refused wait broke the capture"
            graph.launch(origin)
            origin.synchronize()
            graph.close()
    finally:
        done.set()
        thread.join(5)
        elsewhere.close()


def test_bad_origins_get_errors_that_name_origin(host_pool: CudaStreamPool) -> None:
    released = host_pool.acquire_compute()
    released.release()
    with (
        CudaStreamPool(1, 0, 0, backend="host", device=1) as other_device,
        other_device.acquire_compute() as foreign,
        pytest.raises(ValueError, match=r"device 1.*cannot join"),
    ):
        host_pool.capture(foreign)
    for origin, error, text in (
        (0, ValueError, "legacy default stream"),
        ("stream", TypeError, "origin='stream'"),
        (None, TypeError, "origin=None"),
        (released, LeaseError, "released"),
    ):
        with pytest.raises(error, match=text):
            host_pool.capture(origin)
    assert host_pool.stats().compute.leased == 0


def test_a_graph_is_launched_only_once_its_capture_ended(host_pool: CudaStreamPool) -> None:
    with host_pool.acquire_comm() as origin:
        with host_pool.capture(origin) as graph:
            assert graph is not None
            with pytest.raises(PoolError, match="still running"):
                graph.launch(origin)
        with pytest.raises(TypeError, match="stream="):
            graph.launch("stream")
        graph.close()
        graph.close()  # idempotent
        assert "closed" in repr(graph)
    with pytest.raises(TypeError, match="no public constructor"):
        CapturedGraph()


# -- the host backend's capture rules, which mirror CUDA's ------------------------------


def test_host_streams_are_captured_by_cudas_rules() -> None:
    backend = HostBackend()
    origin, side = backend.create_stream(0, True), backend.create_stream(0, True)
    ran: list[str] = []
    try:
        backend.begin_capture(origin)
        with pytest.raises(RuntimeError, match="capturing already"):
            backend.begin_capture(origin)
        fork, back = HostEvent(False), HostEvent(False)
        backend.record(fork, origin)
        backend.wait_event(side, fork)  # joins
        assert backend.is_capturing(side)
        backend.launch_host_func(side, lambda _: ran.append("side"))
        with pytest.raises(RuntimeError, match="recorded during a capture"):
            backend.query_event(fork)
        with pytest.raises(RuntimeError, match="did not begin"):
            backend.end_capture(side)
        backend.record(back, side)
        backend.wait_event(origin, back)  # joins back
        graph = backend.end_capture(origin)
        assert not backend.is_capturing(side) and ran == []
        backend.launch_graph(graph, side)
        backend.synchronize_stream(side)
        assert ran == ["side"]
        assert backend.query_event(fork)  # its capture ended: like an unrecorded event
    finally:
        for stream in (origin, side):
            backend.destroy_stream(stream)


@pytest.mark.parametrize("mistake", ["unjoined", "synchronize", "outside-event"])
def test_a_host_capture_that_breaks_cudas_rules_fails_at_its_end(mistake: str) -> None:
    backend = HostBackend()
    origin, side = backend.create_stream(0, True), backend.create_stream(0, True)
    try:
        outside = HostEvent(False)
        backend.record(outside, side)
        backend.begin_capture(origin)
        fork = HostEvent(False)
        backend.record(fork, origin)
        backend.wait_event(side, fork)
        backend.launch_host_func(side, lambda _: None)
        if mistake == "synchronize":
            with pytest.raises(RuntimeError, match="cannot be synchronized"):
                backend.synchronize_stream(side)
        elif mistake == "outside-event":
            with pytest.raises(RuntimeError, match="outside its capture"):
                backend.wait_event(origin, outside)
        if mistake != "unjoined":
            back = HostEvent(False)
            backend.record(back, side)
            backend.wait_event(origin, back)
        with pytest.raises(RuntimeError, match="Unjoined" if mistake == "unjoined" else "invalid"):
            backend.end_capture(origin)
        assert not backend.is_capturing(origin) and not backend.is_capturing(side)
    finally:
        for stream in (origin, side):
            backend.destroy_stream(stream)


def test_a_synchronize_racing_a_join_into_a_capture_is_refused_not_hung(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread pulls a stream into its capture while this one synchronizes it.
    CUDA either synchronizes first or refuses; it never waits for ever. The host
    stream's check and its queued mark must be one step: a mark recorded into the
    capture instead of queued never fires."""
    backend = HostBackend()
    origin, side = backend.create_stream(0, True), backend.create_stream(0, True)
    mark_made, joined = threading.Event(), threading.Event()

    class MarkThatLetsTheJoinIn(_host._Mark):
        __slots__ = ()

        def __init__(self) -> None:
            super().__init__()
            if threading.current_thread().name == "synchronizing" and not mark_made.is_set():
                mark_made.set()
                joined.wait()  # the other thread's join lands here, mid-synchronize

    monkeypatch.setattr(_host, "_Mark", MarkThatLetsTheJoinIn)
    outcome: list[BaseException | None] = []

    def synchronize() -> None:
        try:
            backend.synchronize_stream(side)
            outcome.append(None)
        except RuntimeError as error:
            outcome.append(error)

    try:
        backend.begin_capture(origin)
        fork = HostEvent(False)
        backend.record(fork, origin)
        worker = threading.Thread(target=synchronize, name="synchronizing", daemon=True)
        worker.start()
        assert mark_made.wait(10)
        backend.wait_event(side, fork)  # the capture pulls the stream in
        joined.set()
        worker.join(10)
        assert not worker.is_alive(), "synchronize() hangs on a mark recorded into the capture"
        assert outcome and outcome[0] is not None and "cannot be synchronized" in str(outcome[0])
        with pytest.raises(RuntimeError, match="invalid"):
            backend.end_capture(origin)  # the refused synchronization invalidated it, as in CUDA
    finally:
        if backend.is_capturing(origin):
            with contextlib.suppress(RuntimeError):
                backend.end_capture(origin)
        for stream in (origin, side):
            if not stream._stopped:
                stream.stop()
