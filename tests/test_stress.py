"""Concurrency stress: threads x random operations, with the pool's promises checked.

Each thread runs random operations on one shared pool: acquires of every kind
with and without affinity keys, blocking or not, with and without timeouts;
host functions, events, waits between leases, nested acquires, contexts and
statistics reads. The test keeps its own ledger and checks, during the run and
at its end, that no stream is in two leases, none is lost, every waiter is
served or times out within its timeout plus ``SLACK``, work under one key runs
in lease order, waits order work, and the statistics agree with the ledger.

Sizes come from the environment: ``CUPYSTREAMS_STRESS_THREADS`` (16),
``CUPYSTREAMS_STRESS_OPS`` (operations per thread, 2,000; the issue's full run
is 10,000), ``CUPYSTREAMS_SOAK_SECONDS`` (run for at least this long instead),
``CUPYSTREAMS_STRESS_SLACK`` (seconds a waiter may overrun its timeout, 0.5)
and ``CUPYSTREAMS_STRESS_SEED``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import pytest
from reliability_helpers import (
    env_number,
    no_leaks,
    record_figures,
    run_threads,
    switch_interval,
    wait_until,
)

from cupystreams import (
    CudaStreamPool,
    LeaseError,
    PoolExhaustedError,
    PoolStats,
    PoolTimeoutError,
    StreamLease,
    StreamState,
)

THREADS = int(env_number("CUPYSTREAMS_STRESS_THREADS", 16))
OPS = int(env_number("CUPYSTREAMS_STRESS_OPS", 2000))
SOAK_SECONDS = env_number("CUPYSTREAMS_SOAK_SECONDS", 0.0)
SLACK = env_number("CUPYSTREAMS_STRESS_SLACK", 0.5)
SEED = int(os.environ.get("CUPYSTREAMS_STRESS_SEED") or random.randrange(2**32))
EARLY = 2e-3  # clock granularity: a timeout may be reported this much early at most

KINDS = ("compute", "comm", "high_priority")
KEYS = tuple(f"key{i}" for i in range(12))
CAPACITY = {"compute": 3, "comm": 2, "high_priority": 1}
SWITCH_INTERVALS = [pytest.param(None, id="default-switch"), pytest.param(1e-6, id="switch-1us")]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    with no_leaks():
        yield


class _Planned(Exception):
    """Raised on purpose inside a lease block."""


@dataclass
class Tally:
    """What one thread did; summed over threads at the end."""

    ops: int = 0
    acquires: int = 0
    keyed: int = 0
    timeouts: int = 0
    exhaustions: int = 0
    timed_waits: int = 0
    ordered_pairs: int = 0
    host_funcs: int = 0
    events: int = 0
    stats_checks: int = 0
    planned_errors: int = 0
    same_key_refusals: int = 0
    max_overrun_ms: float = 0.0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name.startswith("max") else mine + theirs)


class Ledger:
    """The test's own account of who holds what, shared by the threads."""

    def __init__(self, pool: CudaStreamPool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.holders: dict[int, str] = {}  # stream_id -> holding thread
        self.leased = dict.fromkeys(KINDS, 0)
        self.events_held = 0
        self.violations: list[str] = []
        self.key_turns: dict[str, int] = {}
        self.key_log: dict[str, list[int]] = {key: [] for key in KEYS}

    def violation(self, text: str) -> None:
        self.violations.append(text)  # list.append is atomic: host functions call this too

    def take(self, lease: StreamLease, kind: str, holder: str) -> None:
        stream = lease.stream
        with self.lock:
            other = self.holders.get(stream.stream_id)
            if other is not None:
                self.violation(
                    f"stream {stream.stream_id} leased to {holder} while {other} holds it"
                )
            if stream.kind.value != kind or stream.state is not StreamState.LEASED:
                self.violation(f"{holder} asked for {kind}, got {stream!r}")
            self.holders[stream.stream_id] = holder
            self.leased[kind] += 1

    def give_back(self, lease: StreamLease, kind: str) -> None:
        with self.lock:
            del self.holders[lease.stream.stream_id]
            self.leased[kind] -= 1

    def check_stats(self, threads: int, last: PoolStats | None) -> PoolStats:
        """Compare a snapshot with the ledger; the ledger is frozen meanwhile."""
        with self.lock:
            stats = self.pool.stats()
            for kind in KINDS:
                k = getattr(stats, kind)
                if not self.leased[kind] <= k.leased <= k.capacity:
                    self.violation(f"{kind}: ledger holds {self.leased[kind]}, stats say {k}")
                if k.idle != k.capacity - k.leased or not 0 <= k.waiting <= threads:
                    self.violation(f"{kind}: inconsistent {k}")
            if stats.events.in_use < self.events_held:
                self.violation(f"events in use {stats.events} < {self.events_held} held")
            if stats.events.idle > stats.events.max_size:
                self.violation(f"more idle events than max_size: {stats.events}")
        if last is not None and (
            stats.acquisitions < last.acquisitions
            or stats.timeouts < last.timeouts
            or stats.exhaustions < last.exhaustions
        ):
            self.violation(f"a counter went down: {last} -> {stats}")
        return stats


class Worker:
    """One thread's random operations against the shared pool."""

    def __init__(
        self, ledger: Ledger, seed: int, name: str, ops: int, until: float, threads: int
    ) -> None:
        self.pool = ledger.pool
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.name = name
        self.ops = ops
        self.until = until
        self.threads = threads
        self.tally = Tally()
        self.last_stats: PoolStats | None = None
        self.kernel: Callable[[], object] | None = None
        if self.pool.backend == "cupy":
            import cupy

            self.kernel = lambda: cupy.arange(64, dtype=cupy.float32) * 2

    # -- acquiring ---------------------------------------------------------------

    def acquire(
        self, kind: str, key: str | None, blocking: bool, timeout: float | None
    ) -> StreamLease | None:
        kwargs: dict[str, Any] = {"blocking": blocking, "timeout": timeout}
        if key is not None:
            kwargs["affinity_key"] = key
        start = time.monotonic()
        try:
            lease: StreamLease = getattr(self.pool, f"acquire_{kind}")(**kwargs)
        except PoolTimeoutError:
            self.tally.timeouts += 1
            self.check_wait(kind, time.monotonic() - start, timeout, timed_out=True)
            return None
        except PoolExhaustedError:
            self.tally.exhaustions += 1
            if blocking:
                self.ledger.violation(f"blocking acquire of {kind} raised PoolExhaustedError")
            return None
        self.check_wait(kind, time.monotonic() - start, timeout, timed_out=False)
        self.tally.acquires += 1
        self.tally.keyed += key is not None
        self.ledger.take(lease, kind, self.name)
        return lease

    def check_wait(self, kind: str, waited: float, timeout: float | None, timed_out: bool) -> None:
        if timeout is None:
            if timed_out:
                self.ledger.violation(f"{kind}: timeout=None raised PoolTimeoutError")
            return
        self.tally.timed_waits += 1
        overrun = waited - timeout
        self.tally.max_overrun_ms = max(self.tally.max_overrun_ms, overrun * 1e3)
        if overrun > SLACK:
            self.ledger.violation(f"{kind}: waited {waited:.3f} s with timeout={timeout}")
        if timed_out and waited < timeout - EARLY:
            self.ledger.violation(f"{kind}: timed out after {waited:.4f} s < timeout={timeout}")

    def random_acquire(
        self, holding: StreamLease | None = None
    ) -> tuple[StreamLease | None, str, str | None]:
        """A random acquire, nested when the thread is ``holding`` a lease already."""
        rng = self.rng
        nested = holding is not None
        held_key = None if holding is None else holding.affinity_key
        kind = rng.choice(KINDS)
        key = rng.choice(KEYS) if rng.random() < 0.5 else None
        if key == held_key:
            key = None  # asking again for a held key is op_same_key's business
        blocking = rng.random() < 0.85
        roll = rng.random()
        timeout = None if roll < 0.5 else 0.0 if roll < 0.6 else rng.uniform(0.001, 0.05)
        if not blocking:
            timeout = None  # a timeout with blocking=False is refused as a mistake
        if nested and blocking and timeout is None:
            timeout = 0.01  # a holder never waits for ever: no deadlock between holders
        return self.acquire(kind, key, blocking, timeout), kind, key

    # -- operations ----------------------------------------------------------------

    def run(self) -> None:
        operations = (
            (self.op_lease, 50),
            (self.op_stats, 15),
            (self.op_events, 10),
            (self.op_context, 10),
            (self.op_burst, 10),
            (self.op_same_key, 5),
        )
        actions = [a for a, _ in operations]
        weights = [w for _, w in operations]
        while self.tally.ops < self.ops or time.monotonic() < self.until:
            self.rng.choices(actions, weights)[0]()
            self.tally.ops += 1

    def op_lease(self) -> None:
        lease, kind, key = self.random_acquire()
        if lease is None:
            return
        style = self.rng.random()
        if style < 0.45:
            with lease:
                try:
                    self.use(lease, key, current=True)
                finally:
                    self.ledger.give_back(lease, kind)
        elif style < 0.5:
            try:
                with lease:
                    try:
                        self.use(lease, key, current=True)
                    finally:
                        self.ledger.give_back(lease, kind)
                    raise _Planned
            except _Planned:
                self.tally.planned_errors += 1
            if not lease.released:
                self.ledger.violation("a lease survived an exception in its with block")
        else:
            try:
                self.use(lease, key, current=False)
            finally:
                self.ledger.give_back(lease, kind)
                lease.release()

    def use(self, lease: StreamLease, key: str | None, current: bool) -> None:
        """Work done while holding ``lease``."""
        if key is not None:
            # Only the key's holder writes its turn: a second holder would repeat a number.
            turn = self.ledger.key_turns[key] = self.ledger.key_turns.get(key, 0) + 1
            lease.launch_host_func(lambda: self.ledger.key_log[key].append(turn))
            self.tally.host_funcs += 1
        for _ in range(self.rng.randrange(3)):
            roll = self.rng.random()
            if roll < 0.35:
                self.ordered_pair(lease)
            elif roll < 0.55:
                event = lease.record_event()
                event.query()
                event.release()
                self.tally.events += 1
            elif roll < 0.6:
                lease.query()
            elif roll < 0.7:
                lease.synchronize()
            elif roll < 0.85 and current and self.kernel is not None:
                self.kernel()
            else:
                self.op_stats()

    def ordered_pair(self, first: StreamLease) -> None:
        """Order a second lease after ``first`` and check that its work runs after."""
        second, kind, key = self.random_acquire(holding=first)
        if second is None:
            return
        try:
            if key is not None:
                turn = self.ledger.key_turns[key] = self.ledger.key_turns.get(key, 0) + 1
                second.launch_host_func(lambda: self.ledger.key_log[key].append(turn))
            done: list[bool] = []

            def slow_first() -> None:
                time.sleep(0.0002)
                done.append(True)

            first.launch_host_func(slow_first)
            via = self.rng.choice(("lease", "pooled_stream", "event", "wait_event"))
            if via == "lease":
                second.wait(first)
            elif via == "pooled_stream":
                second.wait(first.stream)
            else:
                event = first.record_event()
                second.wait(event) if via == "event" else second.wait_event(event)
                event.release()
            second.launch_host_func(
                lambda: done or self.ledger.violation(f"wait via {via} did not order work")
            )
            self.tally.ordered_pairs += 1
            self.tally.host_funcs += 2
        finally:
            self.ledger.give_back(second, kind)
            second.release()

    def op_stats(self) -> None:
        self.last_stats = self.ledger.check_stats(self.threads, self.last_stats)
        streams = self.pool.stream_stats()
        if any(s.affinity_hits > s.acquisitions for s in streams):
            self.ledger.violation(f"affinity hits exceed acquisitions: {streams}")
        self.tally.stats_checks += 1

    def op_events(self) -> None:
        events = self.pool.events
        held = [events.acquire() for _ in range(self.rng.randint(1, 4))]
        with self.ledger.lock:
            self.ledger.events_held += len(held)
        self.tally.events += len(held)
        if self.rng.random() < 0.5:
            self.op_stats()  # while these events are out
        with self.ledger.lock:
            self.ledger.events_held -= len(held)
        for event in held:
            event.release()

    def op_context(self) -> None:
        kind = self.rng.choice(KINDS)
        key = self.rng.choice(KEYS) if self.rng.random() < 0.5 else None
        context = getattr(self.pool, f"{kind}_context")
        with context(key) as lease:
            self.tally.acquires += 1
            self.tally.keyed += key is not None
            self.ledger.take(lease, kind, self.name)
            try:
                self.use(lease, key, current=True)
            finally:
                self.ledger.give_back(lease, kind)

    def op_burst(self) -> None:
        """Grab one stream of every kind without blocking, then let them go."""
        got = [(self.acquire(kind, None, False, None), kind) for kind in KINDS]
        for lease, kind in got:
            if lease is not None:
                self.ledger.give_back(lease, kind)
                lease.release()

    def op_same_key(self) -> None:
        """A thread asking again for a key it holds is refused, not deadlocked."""
        key = self.rng.choice(KEYS)
        lease = self.acquire("compute", key, True, self.rng.choice((None, 0.01)))
        if lease is None:
            return
        try:
            second = self.pool.acquire_comm(affinity_key=key, blocking=self.rng.random() < 0.5)
        except LeaseError:
            self.tally.same_key_refusals += 1
        else:
            self.ledger.violation(f"same thread got a second lease of {key!r}")
            second.release()
        finally:
            turn = self.ledger.key_turns[key] = self.ledger.key_turns.get(key, 0) + 1
            lease.launch_host_func(lambda: self.ledger.key_log[key].append(turn))
            self.ledger.give_back(lease, "compute")
            lease.release()


def check_quiescent(pool: CudaStreamPool, ledger: Ledger, tally: Tally) -> None:
    """After the threads: nothing held, nothing lost, counters equal the ledger's."""
    pool.sync_all()  # every host function has run; any error it raised surfaces here
    assert ledger.violations == [], f"seed {SEED}: {ledger.violations[:10]}"
    stats = pool.stats()
    assert (stats.leased, stats.waiting) == (0, 0), stats
    assert (stats.acquisitions, stats.timeouts, stats.exhaustions) == (
        tally.acquires,
        tally.timeouts,
        tally.exhaustions,
    ), f"stats {stats} disagree with the threads' tally {tally}"
    assert sum(s.acquisitions for s in pool.stream_stats()) == stats.acquisitions
    for key, log in ledger.key_log.items():
        turns = ledger.key_turns.get(key, 0)
        assert log == list(range(1, turns + 1)), f"work under {key!r} ran out of lease order"
    # No stream lost: every one of them can be leased at once, without waiting.
    everything = [
        getattr(pool, f"acquire_{kind}")(blocking=False)
        for kind in KINDS
        for _ in range(CAPACITY[kind])
    ]
    assert sorted(lease.stream.stream_id for lease in everything) == list(range(len(everything)))
    for lease in everything:
        lease.release()


def stress(backend: str, interval: float | None, threads: int, ops: int) -> None:
    with switch_interval(interval):
        pool = CudaStreamPool(
            compute_streams=CAPACITY["compute"],
            comm_streams=CAPACITY["comm"],
            high_priority_streams=CAPACITY["high_priority"],
            event_pool_size=8,
            backend=backend,
        )
        ledger = Ledger(pool)
        started = time.monotonic()
        until = started + SOAK_SECONDS
        workers = [
            Worker(ledger, SEED + i, f"stress-{i}", ops, until, threads) for i in range(threads)
        ]
        run_threads(
            [w.run for w in workers], timeout=SOAK_SECONDS + 600, what=f"stress seed {SEED}"
        )
        seconds = time.monotonic() - started
        tally = Tally()
        for w in workers:
            tally.add(w.tally)
        check_quiescent(pool, ledger, tally)
        pool.close()
        assert pool.stats().events.in_use == 0, "an event was never returned"
    record_figures(
        "stress",
        backend=backend,
        switch_interval=interval,
        threads=threads,
        seconds=round(seconds, 2),
        seed=SEED,
        **{f.name: getattr(tally, f.name) for f in fields(tally)},
    )


@pytest.mark.parametrize("interval", SWITCH_INTERVALS)
def test_random_operations_from_many_threads(backend: str, interval: float | None) -> None:
    stress(backend, interval, THREADS, OPS)


# -- first come, first served -------------------------------------------------


@pytest.mark.parametrize("interval", SWITCH_INTERVALS)
@pytest.mark.parametrize(
    ("kind", "keyed"),
    [(kind, keyed) for kind in KINDS for keyed in (False, True)],
    ids=lambda value: {False: "no-key", True: "own-keys"}.get(value, value),
)
def test_waiters_are_served_in_arrival_order(
    backend: str, kind: str, keyed: bool, interval: float | None
) -> None:
    """Waiters queued one by one are served in that order; timed-out ones drop out,
    for every kind, with and without affinity keys."""
    waiters, timeout = 8, 0.3
    with switch_interval(interval), CudaStreamPool(1, 1, 1, backend=backend) as pool:
        acquire: Callable[..., StreamLease] = getattr(pool, f"acquire_{kind}")
        holder = acquire()
        served: list[int] = []
        timed_out: list[int] = []

        def wait_turn(i: int) -> None:
            patient = i % 3 != 1  # every third waiter gives up before the holder releases
            kwargs: dict[str, Any] = {"timeout": 30 if patient else timeout}
            if keyed:
                kwargs["affinity_key"] = f"waiter{i}"
            start = time.monotonic()
            try:
                lease = acquire(**kwargs)
            except PoolTimeoutError:
                waited = time.monotonic() - start
                assert timeout - EARLY <= waited <= timeout + SLACK, waited
                timed_out.append(i)
                return
            served.append(i)
            lease.release()

        threads = []
        for i in range(waiters):
            threads.append(threading.Thread(target=wait_turn, args=(i,), daemon=True))
            threads[-1].start()
            wait_until(
                lambda n=i + 1: getattr(pool.stats(), kind).waiting + len(timed_out) >= n,
                timeout=10,
                what=f"waiter {i} is queued",
            )
        impatient = [i for i in range(waiters) if i % 3 == 1]
        wait_until(lambda: len(timed_out) == len(impatient), timeout=10, what="timeouts")
        assert getattr(pool.stats(), kind).waiting == waiters - len(impatient)
        holder.release()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a waiter was never served"
        assert served == [i for i in range(waiters) if i not in impatient]
        assert sorted(timed_out) == impatient
        stats = pool.stats()
        assert (getattr(stats, kind).waiting, stats.leased, stats.timeouts) == (0, 0, 3)


@pytest.mark.parametrize("interval", SWITCH_INTERVALS)
def test_waiters_for_one_key_are_served_in_arrival_order(
    backend: str, interval: float | None
) -> None:
    """A second acquire of a key waits like any acquire, first come first
    served, and is counted in ``stats().waiting`` like any blocked acquire."""
    waiters = 6
    with switch_interval(interval), CudaStreamPool(4, 0, 0, backend=backend) as pool:
        holder = pool.acquire_compute(affinity_key="shared")
        served: list[int] = []

        def wait_turn(i: int) -> None:
            with pool.acquire_compute(affinity_key="shared", timeout=30):
                served.append(i)

        threads = []
        for i in range(waiters):
            threads.append(threading.Thread(target=wait_turn, args=(i,), daemon=True))
            threads[-1].start()
            try:
                wait_until(
                    lambda n=i + 1: pool.stats().waiting >= n,
                    timeout=5,
                    what=f"stats().waiting counts {i + 1} threads blocked on one affinity key",
                )
            except BaseException:
                holder.release()
                for t in threads:
                    t.join(30)
                raise
        holder.release()
        for t in threads:
            t.join(30)
        assert served == list(range(waiters))
