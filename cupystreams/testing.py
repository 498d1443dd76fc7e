"""Hypothesis state machine over the public pool API, for any pool configuration.

Run it against your own configuration::

    from cupystreams import CudaStreamPool
    from cupystreams.testing import run_pool_state_machine

    def test_my_pool() -> None:
        run_pool_state_machine(lambda: CudaStreamPool(compute_streams=3, backend="host"))

After every step the machine compares the pool with a plain-Python model: no
stream in two leases, leased + idle = capacity per kind, one live lease per
affinity key, statistics equal to the model's, and tasks enqueued across
waits run in the order the waits imply. Acquires are non-blocking (or time
out at once) because the machine drives the pool from one thread.

The tasks are what the backend runs in stream order: on the host backend,
host functions (a held-back one blocks its stream, as on a GPU); on the
cupy backend, a tiny kernel that takes a ticket from a device counter (a
held-back one spins first), so the order is checked on the device itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

try:
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        Bundle,
        RuleBasedStateMachine,
        consumes,
        invariant,
        precondition,
        rule,
        run_state_machine_as_test,
    )
except ModuleNotFoundError as exc:
    if exc.name != "hypothesis":
        raise
    raise ImportError(
        "cupystreams.testing needs Hypothesis, which comes with the test extra: "
        "pip install 'cupystreams[test]'",
        name="hypothesis",
    ) from exc

from ._errors import LeaseError, PoolClosedError, PoolExhaustedError, PoolTimeoutError
from ._events import PooledEvent
from ._lease import StreamLease
from ._pool import CudaStreamPool
from ._stats import KindStats

__all__ = ["PoolStateMachine", "run_pool_state_machine"]

KINDS = ("compute", "comm", "high_priority")
KEYS = ("a", "b", "c")
# How long a producer's task is held back after a wait was queued: ample for
# a consumer's task to run first if the wait were missing.
GATE_SECONDS = 0.002
CLOSE_AFTER_STEPS = 10


class _TaskOrder(Protocol):
    """Runs numbered tasks in stream order and reports the order they ran in."""

    def enqueue(self, lease: StreamLease, token: int, gate: threading.Event | None) -> None:
        """Queue task ``token`` on ``lease``; while ``gate`` is shut, hold it back."""
        ...

    def ran(self) -> list[int]:
        """The tokens of the tasks that ran, in the order they ran (after a sync)."""
        ...


class _HostFunctionOrder:
    """Tasks as host functions: a held-back one blocks its host stream."""

    def __init__(self) -> None:
        self._log: list[int] = []
        self._lock = threading.Lock()

    def enqueue(self, lease: StreamLease, token: int, gate: threading.Event | None) -> None:
        log, lock = self._log, self._lock

        def append() -> None:
            if gate is not None:
                gate.wait()
            with lock:
                log.append(token)

        lease.launch_host_func(append)

    def ran(self) -> list[int]:
        with self._lock:
            return list(self._log)


_TICKET_KERNEL = r"""
extern "C" __global__ void take_ticket(int* counter, int* tickets, int token, long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while ((long long)(now - start) < ns);
    tickets[token] = atomicAdd(counter, 1);
}
"""


class _DeviceTicketOrder:
    """Tasks as one-thread kernels that take a ticket from a device counter.

    A held-back task spins ``GATE_SECONDS`` on the device first: were a wait
    missing, a task queued after it on another stream would take its ticket
    first.
    """

    MAX_TOKENS = 1 << 16

    def __init__(self, device: int) -> None:
        import cupy

        with cupy.cuda.Device(device):
            self._counter = cupy.zeros(1, dtype=cupy.int32)
            self._tickets = cupy.full(self.MAX_TOKENS, -1, dtype=cupy.int32)
            self._kernel = cupy.RawKernel(_TICKET_KERNEL, "take_ticket")
            cupy.cuda.Device().synchronize()  # visible to every pool stream from now on
        self._device = device
        self._tokens = 0

    def enqueue(self, lease: StreamLease, token: int, gate: threading.Event | None) -> None:
        import numpy

        if token >= self.MAX_TOKENS:
            raise RuntimeError("the order check ran out of tickets; run fewer steps")
        self._tokens = max(self._tokens, token + 1)
        hold_ns = int(GATE_SECONDS * 1e9) if gate is not None else 0
        with lease.cupy_stream:
            self._kernel(
                (1,), (1,), (self._counter, self._tickets, numpy.int32(token), numpy.int64(hold_ns))
            )

    def ran(self) -> list[int]:
        import cupy

        with cupy.cuda.Device(self._device):
            cupy.cuda.Device().synchronize()
            tickets = self._tickets[: self._tokens].get()
        taken = [(int(ticket), token) for token, ticket in enumerate(tickets) if ticket >= 0]
        return [token for _, token in sorted(taken)]


def _task_order(pool: CudaStreamPool) -> _TaskOrder:
    if pool.backend == "cupy":
        return _DeviceTicketOrder(pool.device)
    return _HostFunctionOrder()


@dataclass
class _ModelLease:
    """What the model knows about one live lease."""

    lease: StreamLease
    kind: str
    key: str | None
    tasks: list[int] = field(default_factory=list)  # host-function tokens, in order


@dataclass
class _Ordering:
    """Every token in ``before`` runs before every token in ``after``."""

    before: list[int]
    after: list[int]


class PoolStateMachine(RuleBasedStateMachine):
    """Random sequences of pool operations checked against a plain-Python model.

    Args:
        make_pool: Returns a fresh pool for each example; the machine closes it.
    """

    leases = Bundle("leases")
    released = Bundle("released")

    def __init__(self, make_pool: Callable[[], CudaStreamPool]) -> None:
        super().__init__()
        self.pool = make_pool()
        start = self.pool.stats()
        self.capacity = {kind: getattr(start, kind).capacity for kind in KINDS}
        self.live: dict[int, _ModelLease] = {}  # id(lease) -> model
        self.acquisitions = start.acquisitions
        self.exhaustions = start.exhaustions
        self.timeouts = start.timeouts
        self.closed = False
        self.order = _task_order(self.pool)
        self.orderings: list[_Ordering] = []
        self.next_token = 0
        self.steps = 0

    # -- helpers -------------------------------------------------------------

    def _leased(self, kind: str) -> int:
        return sum(1 for m in self.live.values() if m.kind == kind)

    def _acquire(self, kind: str, key: str | None, blocking: bool) -> StreamLease:
        if kind == "high_priority":
            timeout = 0 if blocking else None
            return self.pool.acquire_high_priority(blocking=blocking, timeout=timeout)
        method = self.pool.acquire_compute if kind == "compute" else self.pool.acquire_comm
        return method(affinity_key=key, blocking=blocking, timeout=0 if blocking else None)

    def _enqueue(self, model: _ModelLease, gate: threading.Event | None = None) -> int:
        token = self.next_token
        self.next_token += 1
        self.order.enqueue(model.lease, token, gate)
        model.tasks.append(token)
        return token

    # -- rules -----------------------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(
        target=leases,
        kind=st.sampled_from(KINDS),
        key=st.one_of(st.none(), st.sampled_from(KEYS)),
        blocking=st.booleans(),
    )
    def acquire(self, kind: str, key: str | None, blocking: bool) -> Any:
        key = None if kind == "high_priority" else key
        if self.capacity[kind] == 0:
            try:
                self._acquire(kind, key, blocking)
            except ValueError:
                return None
            raise AssertionError(f"acquiring a {kind} stream from a pool with none succeeded")
        key_held = key is not None and any(m.key == key for m in self.live.values())
        full = self._leased(kind) == self.capacity[kind]
        try:
            lease = self._acquire(kind, key, blocking)
        except LeaseError:
            assert key_held, "LeaseError although the key was free"
            return None
        except PoolExhaustedError:
            assert full and not blocking, "PoolExhaustedError with an idle stream"
            self.exhaustions += 1
            return None
        except PoolTimeoutError:
            assert full and blocking, "PoolTimeoutError with an idle stream"
            self.timeouts += 1
            return None
        assert not key_held, "a second live lease for one affinity key"
        assert not full, "a lease beyond capacity"
        model = _ModelLease(lease, kind, key)
        self.live[id(lease)] = model
        self.acquisitions += 1
        return lease

    @rule(lease=consumes(leases), target=released)
    def release(self, lease: StreamLease | None) -> Any:
        if lease is None:
            return None
        if self.closed:
            lease.release()  # a no-op after close
            return lease
        lease.release()
        del self.live[id(lease)]
        assert lease.released
        return lease

    @rule(lease=released)
    def release_twice_raises(self, lease: StreamLease | None) -> None:
        if lease is None:
            return
        try:
            lease.release()
        except LeaseError:
            return
        raise AssertionError("a second release did not raise LeaseError")

    @rule(lease=released)
    def use_after_release_raises(self, lease: StreamLease | None) -> None:
        if lease is None:
            return
        for use in (lease.query, lease.synchronize, lambda: lease.stream):
            try:
                use()
            except LeaseError:
                continue
            raise AssertionError("a released lease still worked")

    @precondition(lambda self: not self.closed)
    @rule(lease=leases)
    def enqueue_task(self, lease: StreamLease | None) -> None:
        if lease is not None and id(lease) in self.live:
            self._enqueue(self.live[id(lease)])

    @precondition(lambda self: not self.closed)
    @rule(waiter=leases, producer=leases, through_event=st.booleans())
    def wait_between_leases(
        self, waiter: StreamLease | None, producer: StreamLease | None, through_event: bool
    ) -> None:
        if waiter is None or producer is None or waiter is producer:
            return
        if id(waiter) not in self.live or id(producer) not in self.live:
            return
        self._order(self.live[id(waiter)], self.live[id(producer)], through_event)

    # The bundle above also holds failed acquires and released leases, so two
    # distinct live ones meet there rarely; this rule draws them directly.
    @precondition(lambda self: not self.closed and len(self.live) >= 2)
    @rule(data=st.data(), through_event=st.booleans())
    def wait_between_live_leases(self, data: st.DataObject, through_event: bool) -> None:
        waiter, producer = data.draw(st.permutations(list(self.live.values())))[:2]
        self._order(waiter, producer, through_event)

    def _order(self, consumer: _ModelLease, producer: _ModelLease, through_event: bool) -> None:
        """Make ``consumer`` wait for ``producer`` and record what must run in which order."""
        # The producer's last task is held at a gate until the
        # consumer's first one had time to run: were the wait missing, the
        # consumer's would run first, and the order check would see it.
        gate = threading.Event()
        try:
            self._enqueue(producer, gate)
            produced = list(producer.tasks)
            if through_event:
                event = producer.lease.record_event()
                consumer.lease.wait(event)
                event.release()
            else:
                consumer.lease.wait(producer.lease)
            consumer.tasks = []  # tokens enqueued from now on must follow `produced`
            self.orderings.append(_Ordering(produced, consumer.tasks))
            self._enqueue(consumer)
            if self.pool.backend == "host":
                time.sleep(GATE_SECONDS)  # the consumer's chance to run first
        finally:
            gate.set()  # never left shut: a shut gate would hold the stream for good

    @precondition(lambda self: not self.closed)
    @rule()
    def event_round_trip(self) -> None:
        with self.pool.events.event_context() as event:
            assert isinstance(event, PooledEvent)
        try:
            event.release()
        except LeaseError:
            return
        raise AssertionError("releasing an event twice did not raise LeaseError")

    @precondition(lambda self: not self.closed)
    @rule()
    def sync_and_check_order(self) -> None:
        self.pool.sync_all()
        self._check_orderings()

    # Closing ends what a run can test, so it waits until a run had some steps
    # (left free, Hypothesis would close most runs within their first few).
    @precondition(lambda self: not self.closed and self.steps >= CLOSE_AFTER_STEPS)
    @rule()
    def close(self) -> None:
        self.pool.sync_all()
        self._check_orderings()
        self.pool.close()
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule(kind=st.sampled_from(KINDS))
    def acquire_after_close_raises(self, kind: str) -> None:
        try:
            self._acquire(kind, None, blocking=False)
        except PoolClosedError:
            return
        raise AssertionError("acquire after close did not raise PoolClosedError")

    # -- invariants --------------------------------------------------------------

    def _check_orderings(self) -> None:
        position = {token: i for i, token in enumerate(self.order.ran())}
        for ordering in self.orderings:
            ran_after = [position[t] for t in ordering.after if t in position]
            if not ran_after:
                continue
            for token in ordering.before:
                assert token in position, f"token {token} never ran but a later wait passed"
                assert position[token] < min(ran_after), "a wait did not order tasks"

    @invariant()
    def count_steps(self) -> None:
        self.steps += 1

    @invariant()
    def streams_are_exclusive(self) -> None:
        if self.closed:
            return
        ids = [m.lease.stream.stream_id for m in self.live.values()]
        assert len(ids) == len(set(ids)), f"one stream in two leases: {ids}"

    @invariant()
    def one_live_lease_per_key(self) -> None:
        keys = [m.key for m in self.live.values() if m.key is not None]
        assert len(keys) == len(set(keys)), f"two live leases share a key: {keys}"

    @invariant()
    def stats_match_model(self) -> None:
        stats = self.pool.stats()
        assert stats.closed == self.closed
        assert stats.acquisitions == self.acquisitions
        assert stats.exhaustions == self.exhaustions
        assert stats.timeouts == self.timeouts
        for kind in KINDS:
            figures: KindStats = getattr(stats, kind)
            assert figures.capacity == self.capacity[kind]
            assert figures.waiting == 0
            if not self.closed:
                assert figures.leased == self._leased(kind), (kind, figures)
                assert figures.leased + figures.idle == figures.capacity

    def teardown(self) -> None:
        self.pool.close()  # waits for every stream: every task has run
        self._check_orderings()


def run_pool_state_machine(
    make_pool: Callable[[], CudaStreamPool],
    *,
    max_examples: int = 50,
    stateful_step_count: int = 40,
) -> None:
    """Run ``PoolStateMachine`` against pools from ``make_pool`` (a Hypothesis test)."""
    run_state_machine_as_test(
        # Hypothesis calls any zero-argument factory; its stub says "type".
        lambda: PoolStateMachine(make_pool),  # type: ignore[arg-type]
        settings=settings(
            max_examples=max_examples, stateful_step_count=stateful_step_count, deadline=None
        ),
    )
