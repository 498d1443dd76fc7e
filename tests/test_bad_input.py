"""Bad input, table-driven, over every public entry point.

Each row calls one entry point with a wrong type or value and names the error
it must raise and the text its message must contain (the argument, or the
environment variable, at fault). Around each call the test takes a snapshot of
everything the call could have touched: the statistics of the pools involved,
per-stream statistics, whether the held leases are still live and usable, and
the count of live streams, events, leases and host threads. The snapshots must
be equal: bad input changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
from reliability_helpers import live_objects, no_leaks, record_figures

from cupystreams import (
    BackendUnavailableError,
    CapturedGraph,
    CudaStreamPool,
    EventPool,
    LeaseError,
    PoolClosedError,
    StreamLease,
    _backends,
    comm_stream,
    compute_stream,
    get_global_stream_pool,
    high_priority_stream,
    reset_global_pool,
)
from cupystreams._backends import GpuProblem
from cupystreams._backends._host import HostBackend

# Objects one bad call may create before the test calls it a runaway.
CREATION_BUDGET = 64


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    with no_leaks():
        yield


class Ctx:
    """Pools, leases and events in every state a bad call can be aimed at."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.pool = CudaStreamPool(2, 1, 1, event_pool_size=4, backend=backend)
        self.least, self.greatest = self.pool.priority_range
        self.other = CudaStreamPool(1, 0, 0, backend=backend)
        self.closed = CudaStreamPool(1, 1, 1, backend=backend)
        self.closed_lease = self.closed.acquire_compute()
        self.closed.close()
        self.lease = self.pool.acquire_compute(affinity_key="held")
        self.released = self.pool.acquire_comm()
        self.released.release()
        self.other_lease = self.other.acquire_compute()
        self.event = self.pool.events.acquire()
        self.released_event = self.pool.events.acquire()
        self.released_event.release()
        self.other_event = self.other.events.acquire()
        self.global_pool = get_global_stream_pool()
        # A graph to launch (host only: CUDA graphs are tested in test_capture_gpu).
        self.graph: CapturedGraph | None = None
        if backend == "host":
            with self.pool.capture(self.lease) as self.graph:
                self.lease.launch_host_func(lambda: None)

    def snapshot(self) -> tuple[object, ...]:
        held = self.lease.stream.stream_id
        streams = [
            dataclasses.replace(s, total_active_ms=0.0) if s.stream_id == held else s
            for s in self.pool.stream_stats()
        ]
        return (
            self.pool.stats(),
            streams,
            self.other.stats(),
            self.closed.stats(),
            self.global_pool.stats(),
            (self.lease.released, self.other_lease.released, self.closed_lease.released),
            live_objects(),
        )

    def check_still_usable(self) -> None:
        self.lease.launch_host_func(lambda: None)
        self.lease.synchronize()
        self.event.record(self.lease)
        self.event.synchronize()

    def close(self) -> None:
        for lease in (self.lease, self.other_lease, self.closed_lease):
            if not lease.released:
                lease.release()
        for event in (self.event, self.other_event):
            event.release()
        for pool in (self.pool, self.other, self.closed):
            pool.close()
        if self.graph is not None:
            self.graph.close()
        reset_global_pool()


@dataclass(frozen=True)
class Case:
    """One bad call: ``call(ctx)`` must raise ``error`` with ``names`` in its message
    (and without ``absent``: an argument the call did not pass, say)."""

    id: str
    call: Callable[[Ctx], object]
    error: type[BaseException] | tuple[type[BaseException], ...]
    names: str
    env: dict[str, str] = field(default_factory=dict)
    backends: tuple[str, ...] = ("host", "cupy")
    absent: tuple[str, ...] = ()


def enter(context: AbstractContextManager[Any]) -> None:
    with context:
        pass


def without_gpu(call: Callable[[Ctx], object]) -> Callable[[Ctx], object]:
    """``call`` on a machine where every probe of the GPU finds none."""
    problem = GpuProblem("no NVIDIA GPU or CUDA driver found", "libcuda.so.1: cannot open")

    def run(c: Ctx) -> object:
        with mock.patch.object(_backends, "_probe_cupy", lambda: problem):
            return call(c)

    return run


def pool_of(backend: str, **kwargs: Any) -> CudaStreamPool:
    pool = CudaStreamPool(**{"backend": backend, **kwargs})
    pool.close()  # reached only when the bad argument was accepted
    return pool


BAD_TIMEOUTS: list[tuple[str, object, type[Exception]]] = [
    ("negative", -1, ValueError),
    ("negative-small", -1e-9, ValueError),
    ("nan", math.nan, ValueError),
    ("minus-inf", -math.inf, ValueError),
    ("str", "1", TypeError),
    ("bool", True, TypeError),
    ("list", [1], TypeError),
]
BAD_FLAGS: list[tuple[str, object]] = [("str", "no"), ("none", None), ("int", 1)]
UNHASHABLE_KEYS: list[tuple[str, object]] = [("list", [1]), ("dict", {"a": 1}), ("set", {1})]
NOT_STREAMS: list[tuple[str, object, type[Exception]]] = [
    ("str", "stream", TypeError),
    ("none", None, TypeError),
    ("float", 1.5, TypeError),
    ("bool", True, TypeError),
    ("object", object(), TypeError),
    ("negative-int", -1, ValueError),
    ("huge-int", 2**70, (ValueError, TypeError)),  # type: ignore[list-item]
]
NOT_EVENTS: list[tuple[str, Callable[[Ctx], object]]] = [
    ("str", lambda c: "event"),
    ("none", lambda c: None),
    ("int", lambda c: 0),
    ("lease", lambda c: c.lease),
]
ACQUIRES = ("compute", "comm", "high_priority")


def acquire_cases() -> list[Case]:
    cases: list[Case] = []
    for kind in ACQUIRES:

        def call(c: Ctx, kind: str = kind, **kwargs: Any) -> object:
            return getattr(c.pool, f"acquire_{kind}")(**kwargs)

        for name, value, error in BAD_TIMEOUTS:
            cases.append(
                Case(
                    f"acquire_{kind}-timeout-{name}",
                    lambda c, call=call, v=value: call(c, timeout=v),
                    error,
                    "timeout",
                )
            )
        for name, value in BAD_FLAGS:
            cases.append(
                Case(
                    f"acquire_{kind}-blocking-{name}",
                    lambda c, call=call, v=value: call(c, blocking=v),
                    TypeError,
                    "blocking",
                )
            )
        # A timeout that blocking=False would ignore is refused, not ignored.
        cases.append(
            Case(
                f"acquire_{kind}-timeout-with-blocking-False",
                lambda c, call=call: call(c, blocking=False, timeout=1),
                ValueError,
                "timeout=1",
            )
        )
        for name, value in UNHASHABLE_KEYS:
            cases.append(
                Case(
                    f"acquire_{kind}-affinity_key-{name}",
                    lambda c, call=call, v=value: call(c, affinity_key=v),
                    TypeError,
                    "affinity_key",
                )
            )
            cases.append(
                Case(
                    f"{kind}_context-affinity_key-{name}",
                    lambda c, k=kind, v=value: enter(getattr(c.pool, f"{k}_context")(v)),
                    TypeError,
                    "affinity_key",
                )
            )
        cases.append(
            Case(
                f"acquire_{kind}-key-this-thread-holds",
                lambda c, call=call: call(c, affinity_key="held"),
                LeaseError,
                "affinity_key",
            )
        )
    return cases


def constructor_cases() -> list[Case]:
    cases: list[Case] = []
    for arg in ("compute_streams", "comm_streams", "high_priority_streams", "event_pool_size"):
        for name, value, error in (
            ("negative", -1, ValueError),
            ("float", 2.0, TypeError),
            ("str", "4", TypeError),
            ("bool", True, TypeError),
            ("none", None, TypeError),
        ):
            cases.append(
                Case(
                    f"CudaStreamPool-{arg}-{name}",
                    lambda c, a=arg, v=value: pool_of(c.backend, **{a: v}),
                    error,
                    arg,
                    # The pool builds its EventPool from event_pool_size: the
                    # message must not blame that pool's arguments.
                    absent=("initial_size", "max_size") if arg == "event_pool_size" else (),
                )
            )
    for arg in ("compute_streams", "comm_streams", "high_priority_streams"):
        cases.append(
            Case(
                f"CudaStreamPool-{arg}-huge",
                lambda c, a=arg: pool_of(c.backend, **{a: 2**40}),
                ValueError,
                arg,
            )
        )
    for arg, value, error in (
        ("max_affinity_keys", 0, ValueError),
        ("max_affinity_keys", -1, ValueError),
        ("max_affinity_keys", 2.5, TypeError),
        ("enable_affinity", 1, TypeError),
        ("enable_affinity", "yes", TypeError),
        ("non_blocking", "yes", TypeError),
        ("non_blocking", None, TypeError),
        ("device", -1, ValueError),
        ("device", 2**40, ValueError),
        ("device", "0", TypeError),
        ("device", 0.0, TypeError),
        ("high_priority", "max", TypeError),
        ("high_priority", -1.0, TypeError),
        ("high_priority", None, TypeError),
        ("high_priority", 2**70, ValueError),
        ("high_priority", -(2**70), ValueError),
    ):
        cases.append(
            Case(
                f"CudaStreamPool-{arg}-{value!r}",
                lambda c, a=arg, v=value: pool_of(c.backend, **{a: v}),
                error,
                arg,
            )
        )
    cases += [
        Case(
            "CudaStreamPool-no-streams-at-all",
            lambda c: pool_of(
                c.backend, compute_streams=0, comm_streams=0, high_priority_streams=0
            ),
            ValueError,
            "compute_streams",
        ),
        Case(
            "CudaStreamPool-high_priority-below-least",
            lambda c: pool_of(c.backend, high_priority=c.least + 1),
            ValueError,
            "high_priority",
        ),
        Case(
            "CudaStreamPool-high_priority-above-greatest",
            lambda c: pool_of(c.backend, high_priority=c.greatest - 1),
            ValueError,
            "high_priority",
        ),
    ]
    for name, value, error in (
        ("unknown", "opencl", ValueError),
        ("none", None, (ValueError, TypeError)),
        ("int", 0, (ValueError, TypeError)),
    ):
        cases.append(
            Case(
                f"CudaStreamPool-backend-{name}",
                lambda c, v=value: CudaStreamPool(backend=v),
                error,
                "backend",
                absent=("did you mean",),
            )
        )
    lower_case = "backend names are lower case: did you mean"
    for value, meant in (("HOST", "host"), ("Cupy", "cupy"), ("AUTO", "auto")):
        cases.append(
            Case(
                f"CudaStreamPool-backend-{value}",
                lambda c, v=value: CudaStreamPool(backend=v),
                ValueError,
                f"backend={value!r} is not one of ('auto', 'cupy', 'host'); "
                f"{lower_case} {meant!r}?",
            )
        )
        cases.append(
            Case(
                f"EventPool-backend-{value}",
                lambda c, v=value: EventPool(backend=v),
                ValueError,
                f"{lower_case} {meant!r}?",
            )
        )
        cases.append(
            Case(
                f"env-CUPYSTREAMS_BACKEND-{value}",
                lambda c: CudaStreamPool(),
                ValueError,
                f"CUPYSTREAMS_BACKEND={value!r} is not one of ('auto', 'cupy', 'host'); "
                f"{lower_case} {meant!r}?",
                env={"CUPYSTREAMS_BACKEND": value},
            )
        )
    for value in ("vulkan", "Host", " host", "cupy,host"):
        cases.append(
            Case(
                f"env-CUPYSTREAMS_BACKEND-{value!r}",
                lambda c: CudaStreamPool(),
                ValueError,
                "CUPYSTREAMS_BACKEND",
                env={"CUPYSTREAMS_BACKEND": value},
            )
        )
        cases.append(
            Case(
                f"env-CUPYSTREAMS_BACKEND-{value!r}-global",
                lambda c: get_global_stream_pool(),
                ValueError,
                "CUPYSTREAMS_BACKEND",
                env={"CUPYSTREAMS_BACKEND": value},
            )
        )
    for value in ("0", "33", "-1", "eight", "8.5", "1e3"):
        cases.append(
            Case(
                f"env-CUDA_DEVICE_MAX_CONNECTIONS-{value!r}",
                lambda c: pool_of("cupy"),
                ValueError,
                "CUDA_DEVICE_MAX_CONNECTIONS",
                env={"CUDA_DEVICE_MAX_CONNECTIONS": value},
                backends=("cupy",),
            )
        )
    return cases


def event_pool_cases() -> list[Case]:
    cases: list[Case] = []
    for arg, kwargs, error in (
        ("initial_size", {"initial_size": -1}, ValueError),
        ("initial_size", {"initial_size": 2.0}, TypeError),
        ("initial_size", {"initial_size": "8"}, TypeError),
        ("max_size", {"max_size": -1}, ValueError),
        ("max_size", {"max_size": "64"}, TypeError),
        ("initial_size", {"initial_size": 9, "max_size": 8}, ValueError),
        ("initial_size", {"initial_size": 1, "max_size": 0}, ValueError),
        ("initial_size=65", {"initial_size": 65}, ValueError),  # over the default max_size
        ("max_size", {"initial_size": 2**40, "max_size": 2**40}, ValueError),
        ("timing", {"timing": "yes"}, TypeError),
        ("device", {"device": -1}, ValueError),
    ):
        cases.append(
            Case(
                f"EventPool-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}",
                lambda c, kw=kwargs: EventPool(backend=c.backend, **kw).clear(),
                error,
                arg,
            )
        )
    cases += [
        Case(
            "EventPool-backend-unknown", lambda c: EventPool(backend="gpu"), ValueError, "backend"
        ),
        # An event acquire never waits: there is no blocking= to pass, and the
        # error names the method.
        Case(
            "events.acquire-blocking-False",
            lambda c: c.pool.events.acquire(blocking=False),  # type: ignore[call-arg]
            TypeError,
            "EventPool.acquire() got an unexpected keyword argument 'blocking'",
        ),
        Case(
            "events.acquire-timeout",
            lambda c: c.pool.events.acquire(timeout=1),  # type: ignore[call-arg]
            TypeError,
            "EventPool.acquire() got an unexpected keyword argument 'timeout'",
        ),
    ]
    return cases


def release_cases() -> list[Case]:
    return [
        Case("release-str", lambda c: c.pool.release("lease"), TypeError, "lease"),
        Case("release-none", lambda c: c.pool.release(None), TypeError, "lease"),
        Case("release-event", lambda c: c.pool.release(c.event), TypeError, "lease"),
        Case("release-twice", lambda c: c.pool.release(c.released), LeaseError, "released"),
        Case("release-other-pool", lambda c: c.pool.release(c.other_lease), LeaseError, "pool"),
        Case("lease.release-twice", lambda c: c.released.release(), LeaseError, "released"),
    ]


def released_lease_cases() -> list[Case]:
    uses: list[tuple[str, Callable[[Ctx], object]]] = [
        ("synchronize", lambda c: c.released.synchronize()),
        ("query", lambda c: c.released.query()),
        ("wait", lambda c: c.released.wait(c.lease)),
        ("wait_event", lambda c: c.released.wait_event(c.event)),
        ("record_event", lambda c: c.released.record_event()),
        ("launch_host_func", lambda c: c.released.launch_host_func(lambda: None)),
        ("enter", lambda c: enter(c.released)),
        ("stream", lambda c: c.released.stream),
        ("cupy_stream", lambda c: c.released.cupy_stream),
        ("__cuda_stream__", lambda c: c.released.__cuda_stream__()),
    ]
    return [Case(f"released-lease.{n}", use, LeaseError, "released") for n, use in uses]


def stream_argument_cases() -> list[Case]:
    cases: list[Case] = []
    for name, value, error in NOT_STREAMS:
        cases.append(Case(f"lease.wait-{name}", lambda c, v=value: c.lease.wait(v), error, "other"))
        if value is None:
            continue  # None means "the current stream" to record and record_event
        cases.append(
            Case(f"event.record-{name}", lambda c, v=value: c.event.record(v), error, "stream")
        )
        cases.append(
            Case(
                f"record_event-{name}",
                lambda c, v=value: c.pool.record_event(v).release(),
                error,
                "lease_or_stream",
            )
        )
    for name, event in NOT_EVENTS:
        cases.append(
            Case(
                f"lease.wait_event-{name}",
                lambda c, e=event: c.lease.wait_event(e(c)),
                TypeError,
                "event",
            )
        )
        cases.append(
            Case(
                f"stream.wait_event-{name}",
                lambda c, e=event: c.lease.stream.wait_event(e(c)),
                TypeError,
                "event",
            )
        )
    cases += [
        Case(
            "lease.wait-itself",
            lambda c: c.lease.wait(c.lease),
            ValueError,
            "other= is this lease's own stream",
        ),
        Case(
            "lease.wait-its-own-stream",
            lambda c: c.lease.wait(c.lease.stream),
            ValueError,
            "other= is this lease's own stream",
        ),
        Case(
            "lease.wait-raw-pointer-on-host",
            lambda c: c.lease.wait(12345),
            TypeError,
            "other",
            backends=("host",),
        ),
        Case(
            "lease.wait-released-lease", lambda c: c.lease.wait(c.released), LeaseError, "released"
        ),
        Case(
            "lease.wait-released-event",
            lambda c: c.lease.wait(c.released_event),
            LeaseError,
            "event",
        ),
        Case(
            "lease.wait-closed-pools-lease",
            lambda c: c.lease.wait(c.closed_lease),
            PoolClosedError,
            "closed",
        ),
        Case(
            "lease.wait_event-released-event",
            lambda c: c.lease.wait_event(c.released_event),
            LeaseError,
            "event",
        ),
        Case(
            "lease.launch_host_func-not-callable",
            lambda c: c.lease.launch_host_func(42),
            TypeError,
            "fn",
        ),
        Case(
            "lease.launch_host_func-none",
            lambda c: c.lease.launch_host_func(None),
            TypeError,
            "fn",
        ),
        Case(
            "event.record-released-lease",
            lambda c: c.event.record(c.released),
            LeaseError,
            "released",
        ),
        Case(
            "record_event-released-lease",
            lambda c: c.pool.record_event(c.released).release(),
            LeaseError,
            "released",
        ),
        Case(
            "record_event-an-event",
            lambda c: c.pool.record_event(c.other_event).release(),
            TypeError,
            "lease_or_stream",
        ),
    ]
    return cases


def event_cases() -> list[Case]:
    return [
        Case(
            "released-event.record", lambda c: c.released_event.record(c.lease), LeaseError, "event"
        ),
        Case("released-event.query", lambda c: c.released_event.query(), LeaseError, "event"),
        Case(
            "released-event.synchronize",
            lambda c: c.released_event.synchronize(),
            LeaseError,
            "event",
        ),
        Case(
            "released-event.release", lambda c: c.released_event.release(), LeaseError, "released"
        ),
        Case("released-event.event", lambda c: c.released_event.event, LeaseError, "event"),
        Case(
            "events.release-released-event",
            lambda c: c.pool.events.release(c.released_event),
            LeaseError,
            "released",
        ),
        Case("events.release-str", lambda c: c.pool.events.release("event"), TypeError, "event"),
        Case("events.release-none", lambda c: c.pool.events.release(None), TypeError, "event"),
        Case("events.release-lease", lambda c: c.pool.events.release(c.lease), TypeError, "event"),
        Case(
            "events.release-other-pools-event",
            lambda c: c.pool.events.release(c.other_event),
            LeaseError,
            "another",
        ),
        Case(
            "event.elapsed_time-str", lambda c: c.event.elapsed_time("end"), TypeError, "end_event"
        ),
        Case(
            "event.elapsed_time-no-timing",
            lambda c: c.event.elapsed_time(c.other_event),
            ValueError,
            "timing",
        ),
    ]


def closed_pool_cases() -> list[Case]:
    uses: list[tuple[str, Callable[[Ctx], object]]] = [
        ("acquire_compute", lambda c: c.closed.acquire_compute()),
        ("acquire_comm", lambda c: c.closed.acquire_comm(affinity_key="k")),
        ("acquire_high_priority", lambda c: c.closed.acquire_high_priority(blocking=False)),
        ("acquire_compute-timeout", lambda c: c.closed.acquire_compute(timeout=1)),
        ("compute_context", lambda c: enter(c.closed.compute_context())),
        ("comm_context", lambda c: enter(c.closed.comm_context("k"))),
        ("high_priority_context", lambda c: enter(c.closed.high_priority_context())),
        ("sync_all", lambda c: c.closed.sync_all()),
        ("record_event", lambda c: c.closed.record_event(c.lease)),
        ("events.acquire", lambda c: c.closed.events.acquire()),
        ("lease.synchronize", lambda c: c.closed_lease.synchronize()),
        ("lease.wait", lambda c: c.closed_lease.wait(c.lease)),
        ("lease.record_event", lambda c: c.closed_lease.record_event()),
    ]
    return [Case(f"closed-pool.{n}", use, PoolClosedError, "close") for n, use in uses]


def kind_missing_cases() -> list[Case]:
    return [
        Case(
            "pool-without-comm.acquire_comm",
            lambda c: c.other.acquire_comm(),
            ValueError,
            "comm_streams",
        ),
        Case(
            "pool-without-high.acquire_high_priority",
            lambda c: c.other.acquire_high_priority(),
            ValueError,
            "high_priority_streams",
        ),
        Case(
            "pool-without-comm.comm_context",
            lambda c: enter(c.other.comm_context()),
            ValueError,
            "comm_streams",
        ),
    ]


def capture_cases() -> list[Case]:
    def launch(c: Ctx, stream: object) -> None:
        assert c.graph is not None
        c.graph.launch(stream)

    def keyed_inside(c: Ctx) -> None:
        with c.pool.capture(c.lease):
            c.pool.acquire_comm(affinity_key="k")

    cases: list[Case] = []
    for name, value, error in NOT_STREAMS:
        cases.append(
            Case(f"capture-origin-{name}", lambda c, v=value: c.pool.capture(v), error, "origin")
        )
        if value is not None:  # None: the current stream
            cases.append(
                Case(
                    f"graph.launch-{name}",
                    lambda c, v=value: launch(c, v),
                    error,
                    "stream",
                    backends=("host",),
                )
            )
    return [
        *cases,
        Case("capture-origin-legacy-stream", lambda c: c.pool.capture(0), ValueError, "origin=0"),
        Case(
            "capture-origin-released-lease",
            lambda c: c.pool.capture(c.released),
            LeaseError,
            "released",
        ),
        Case("capture-closed-pool", lambda c: c.closed.capture(c.lease), PoolClosedError, "closed"),
        Case(
            "capture-affinity_key-inside",
            keyed_inside,
            ValueError,
            "affinity_key",
            backends=("host",),  # a capture fills the idle events, which the table counts
        ),
    ]


def global_cases() -> list[Case]:
    return [
        Case(
            "get_global_stream_pool-compute_streams-negative",
            lambda c: get_global_stream_pool(compute_streams=-1),
            ValueError,
            "compute_streams",
        ),
        Case(
            "get_global_stream_pool-comm_streams-str",
            lambda c: get_global_stream_pool(comm_streams="2"),  # type: ignore[arg-type]
            (TypeError, ValueError),
            "comm_streams",
        ),
        Case(
            "get_global_stream_pool-other-sizes",
            lambda c: get_global_stream_pool(compute_streams=8),
            ValueError,
            "compute_streams",
        ),
        Case(
            "compute_stream-affinity_key-list",
            lambda c: enter(compute_stream(affinity_key=[1])),
            TypeError,
            "affinity_key",
        ),
        Case(
            "comm_stream-affinity_key-dict",
            lambda c: enter(comm_stream(affinity_key={})),
            TypeError,
            "affinity_key",
        ),
        Case(
            "high_priority_stream-env-bad-backend",
            lambda c: enter(high_priority_stream()),
            ValueError,
            "CUPYSTREAMS_BACKEND",
            env={"CUPYSTREAMS_BACKEND": "tpu"},
        ),
    ] + [
        # The global functions take no backend: without a GPU the fix they
        # name is the environment variable, not an argument they lack.
        Case(
            f"{name}-no-gpu",
            without_gpu(call),
            BackendUnavailableError,
            "set CUPYSTREAMS_BACKEND=host to use host threads instead (the global pools follow it)",
            env={"CUPYSTREAMS_BACKEND": "auto"},
            absent=("backend='host'",),
        )
        for name, call in (
            ("compute_stream", lambda c: enter(compute_stream())),
            ("comm_stream", lambda c: enter(comm_stream())),
            ("high_priority_stream", lambda c: enter(high_priority_stream())),
            ("get_global_stream_pool", lambda c: get_global_stream_pool()),
        )
    ]


def constructor_block_cases() -> list[Case]:
    import cupystreams

    return [
        Case(f"{name}()", lambda c, n=name: getattr(cupystreams, n)(), TypeError, "acquire")
        for name in ("StreamLease", "PooledStream", "PooledEvent")
    ]


CASES = (
    constructor_cases()
    + event_pool_cases()
    + acquire_cases()
    + kind_missing_cases()
    + closed_pool_cases()
    + release_cases()
    + released_lease_cases()
    + stream_argument_cases()
    + event_cases()
    + capture_cases()
    + global_cases()
    + constructor_block_cases()
)
PARAMS = [
    pytest.param(
        case, backend, id=f"{backend}-{case.id}", marks=[pytest.mark.gpu] * (backend == "cupy")
    )
    for case in CASES
    for backend in case.backends
]


def guard_creation(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Stop a call that creates streams or events without end (a "huge" size that was
    accepted): past ``CREATION_BUDGET`` the backend refuses, and what it made is undone."""
    backend_class: Any = HostBackend
    if backend == "cupy":
        from cupystreams._backends._cupy import CupyBackend

        backend_class = CupyBackend
    made = {"stream": 0, "event": 0}
    streams: list[Any] = []

    def guard(what: str, create: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(self: Any, *args: Any) -> Any:
            made[what] += 1
            if made[what] > CREATION_BUDGET:
                for stream in streams:
                    self.destroy_stream(stream)
                streams.clear()
                raise RuntimeError(f"test guard: the call created over {CREATION_BUDGET} {what}s")
            handle = create(self, *args)
            if what == "stream":
                streams.append(handle)
            return handle

        return guarded

    for what in made:
        name = f"create_{what}"
        monkeypatch.setattr(backend_class, name, guard(what, getattr(backend_class, name)))


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_bad_input_raises_a_named_error_and_changes_nothing(
    case: Case, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", backend)
    ctx = Ctx(backend)
    guard_creation(monkeypatch, backend)
    try:
        before = ctx.snapshot()
        with monkeypatch.context() as env:
            for name, value in case.env.items():
                env.setenv(name, value)
            with pytest.raises(case.error) as info:
                case.call(ctx)
        message = str(info.value)
        assert case.names in message, (
            f"{type(info.value).__name__}({message!r}) does not name {case.names!r}"
        )
        for wrong in case.absent:
            assert wrong not in message, f"{message!r} names {wrong!r}"
        assert ctx.snapshot() == before, "the bad call changed the pool's state"
        ctx.check_still_usable()
    finally:
        ctx.close()


def test_the_table_covers_every_public_entry_point() -> None:
    """Pin the breadth of the table, and report its size for RELIABILITY.md."""
    ids = " ".join(case.id for case in CASES)
    for entry in (
        "CudaStreamPool-",
        "EventPool-",
        "acquire_compute-",
        "acquire_comm-",
        "acquire_high_priority-",
        "compute_context-",
        "comm_context",
        "high_priority_context",
        "release-",
        "lease.release",
        "lease.wait-",
        "lease.wait_event-",
        "stream.wait_event-",
        "lease.launch_host_func-",
        "event.record-",
        "record_event-",
        "events.release-",
        "events.acquire-",
        "event.elapsed_time-",
        "sync_all",
        "capture-origin-",
        "graph.launch-",
        "get_global_stream_pool-",
        "compute_stream-",
        "comm_stream-",
        "high_priority_stream-",
        "env-CUPYSTREAMS_BACKEND",
        "env-CUDA_DEVICE_MAX_CONNECTIONS",
        "StreamLease()",
        "PooledStream()",
        "PooledEvent()",
    ):
        assert entry in ids, f"no bad-input row for {entry}"
    record_figures(
        "bad-input-table",
        cases=len(CASES),
        host_rows=sum("host" in case.backends for case in CASES),
        cupy_rows=sum("cupy" in case.backends for case in CASES),
    )


# -- huge timeouts: wait as for None, never crash -----------------------------------------


@pytest.mark.parametrize("where", ["stream", "key"])
@pytest.mark.parametrize("timeout", [1e10, 1e300, float(2**63), float("inf")])
def test_a_huge_timeout_waits_as_none_does(backend: str, where: str, timeout: float) -> None:
    """A timeout beyond what the OS can wait for means "wait for ever", like None:
    the acquire returns when the holder releases, and does not blow up mid-wait."""
    with CudaStreamPool(1, 1, 0, backend=backend) as pool:
        if where == "stream":
            holder = pool.acquire_compute()
        else:  # the key is held by another thread
            held: list[StreamLease] = []
            taker = threading.Thread(
                target=lambda: held.append(pool.acquire_comm(affinity_key="k"))
            )
            taker.start()
            taker.join()
            holder = held[0]
        releaser = threading.Timer(0.2, holder.release)
        started = time.monotonic()
        releaser.start()
        try:
            key = "k" if where == "key" else None
            pool.acquire_compute(affinity_key=key, timeout=timeout).release()
        finally:
            releaser.join()
        assert time.monotonic() - started >= 0.15, "returned before the holder released"
        stats = pool.stats()
        assert (stats.waiting, stats.timeouts) == (0, 0), stats
