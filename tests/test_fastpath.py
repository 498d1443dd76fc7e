"""The C hot path (``cupystreams/_fastpath.c``): what C code can get wrong.

Reference counts that must balance, Python's own argument errors, the hand-off
to the Python slow path, and the exception safety of making a stream current.
The pool semantics themselves are tested everywhere else, through this path.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from cupystreams import CudaStreamPool, EventPool, LeaseError, PooledEvent, StreamState
from cupystreams._lease import StreamLease

CYCLES = 1000


def _counts(*objects: object) -> list[int]:
    # Garbage of earlier tests holds instances, and each holds its class: a
    # collection in the middle of a test would change the classes' counts.
    gc.collect()
    return [sys.getrefcount(obj) for obj in objects]


def test_leases_leave_no_reference_behind(pool: CudaStreamPool) -> None:
    key = object()
    streams = pool._compute.streams
    watched = [*streams, key, StreamLease, StreamState.LEASED, StreamState.IDLE, pool]
    pool.acquire_compute(key).release()  # the key table remembers the key from here on
    before = _counts(*watched)
    for _ in range(CYCLES):
        pool.acquire_compute().release()
        with pool.acquire_compute(blocking=False):
            pass
        pool.acquire_compute(key).release()
        lease = pool.acquire_compute()
        lease.release()
        with pytest.raises(LeaseError, match="already released"):
            lease.release()
        with pytest.raises(LeaseError, match="released"):
            lease.__enter__()
        with pool.acquire_compute() as entered, pytest.raises(LeaseError, match="entered once"):
            entered.__enter__()
    del lease, entered
    assert _counts(*watched) == before


def test_events_leave_no_reference_behind(pool: CudaStreamPool) -> None:
    events = pool.events
    other = EventPool(initial_size=1, max_size=1, backend=pool._backend)
    handles = [handle for handle, _ in events._idle]
    watched = [*handles, events, other, PooledEvent]
    before = _counts(*watched)
    for _ in range(CYCLES):
        events.release(events.acquire())
        event = events.acquire()
        event.release()
        with pytest.raises(LeaseError, match="already released"):
            events.release(event)
        event = events.acquire()
        with pytest.raises(LeaseError, match="another EventPool"):
            other.release(event)
        events.release(event)
        with pytest.raises(TypeError, match="must be a PooledEvent"):
            events.release("event")  # type: ignore[arg-type]
    del event
    other.clear()
    assert _counts(*watched) == before


def test_acquire_arguments_are_checked_like_python(pool: CudaStreamPool) -> None:
    before = pool.stats()
    with pytest.raises(TypeError, match=r"acquire_compute\(\) got an unexpected keyword .*'key'"):
        pool.acquire_compute(key=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"acquire_comm\(\) takes at most 3 arguments \(4 given\)"):
        pool.acquire_comm(None, True, None, 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"multiple values for argument 'blocking'"):
        pool.acquire_high_priority(True, blocking=True)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"acquire_high_priority\(\) got an unexpected .*'x'"):
        pool.acquire_high_priority(x=1)  # type: ignore[call-arg]
    assert pool.stats() == before
    positional = pool.acquire_compute("key", False, 1.0)
    assert positional.affinity_key == "key"
    positional.release()


def test_leases_are_weakly_referenceable_and_collected(pool: CudaStreamPool) -> None:
    lease = pool.acquire_compute()
    ref = weakref.ref(lease)
    lease.release()
    del lease
    assert ref() is None


def test_a_lease_in_a_reference_cycle_is_collected(backend: str) -> None:
    class Key:
        lease: Any = None

    with CudaStreamPool(1, 0, 0, backend=backend, max_affinity_keys=1) as pool:
        key = Key()
        key.lease = pool.acquire_compute(key)  # lease -> key -> lease
        key.lease.release()
        ref = weakref.ref(key.lease)
        del key
        pool.acquire_compute("another key").release()  # the table forgets the first
        gc.collect()
        assert ref() is None


@pytest.fixture
def host_pool() -> Iterator[CudaStreamPool]:
    """A host pool: its leases enter through ``backend.enter``/``exit``, which tests can break."""
    with CudaStreamPool(2, 1, 1, backend="host") as pool:
        yield pool


def _break_exit(pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_exit(token: object) -> None:
        raise RuntimeError("exit failed")

    monkeypatch.setattr(pool._backend, "exit", broken_exit)


def test_exit_releases_even_when_restoring_fails(
    host_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_exit(host_pool, monkeypatch)
    with pytest.raises(RuntimeError, match="exit failed"), host_pool.acquire_compute() as lease:
        pass
    assert lease.released
    assert host_pool.stats().compute.leased == 0


def test_a_failed_release_in_exit_keeps_the_restore_error_as_context(
    host_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_exit(host_pool, monkeypatch)
    # A keyed lease releases through Python, which asks _capturing.
    with pytest.raises(LeaseError) as caught, host_pool.acquire_compute("key") as lease:
        stream = lease.stream
        stream._capturing = lambda: 1
    assert "still capturing" in str(caught.value)
    assert isinstance(caught.value.__context__, RuntimeError)
    stream._capturing = None
    lease.release()
    assert host_pool.stats().compute.leased == 0


_RUN_ALONE = textwrap.dedent(
    """
    # A process of its own: it installs fake CuPy calls (and no driver call),
    # which must not meet a real GPU process's configuration.
    import json
    from cupystreams import _fastpath

    calls = []

    class Stream:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def use(self):
            calls.append(("use", self.name))
            if self.fail:
                raise RuntimeError(f"use {self.name} failed")

    state = {"device": 0}

    def set_device(device):
        calls.append(("set_device", device))
        state["device"] = device

    _fastpath.configure_cupy(
        get_device=lambda: state["device"],
        set_device=set_device,
        get_current_stream=lambda device: Stream(f"previous-on-{device}"),
    )
    report = {}
    saved = _fastpath.make_current(1, Stream("mine"))
    report["switch"] = [calls[:], saved[0], saved[1].name]
    calls.clear()
    _fastpath.restore_current(1, saved)
    report["restore"] = [calls[:], state["device"]]
    saved = _fastpath.make_current(1, Stream("mine"))
    set_device(2)  # a block that leaves another device current
    calls.clear()
    _fastpath.restore_current(1, saved)
    report["restore_from_elsewhere"] = [calls[:], state["device"]]
    calls.clear()
    try:
        _fastpath.make_current(1, Stream("broken", fail=True))
    except RuntimeError as exc:
        report["failed_switch"] = [calls[:], state["device"], str(exc)]
    calls.clear()
    state["device"] = 1
    try:
        _fastpath.restore_current(1, (0, Stream("broken-previous", fail=True)))
    except RuntimeError as exc:
        report["failed_restore"] = [calls[:], state["device"], str(exc)]
    # A lease whose stream enters through CuPy's switch (as on the cupy backend).
    from cupystreams import CudaStreamPool
    lease = CudaStreamPool(1, 0, 0, backend="host").acquire_compute()
    stream = lease.stream
    stream._cupy_current, stream._device, stream._handle = True, 1, Stream("leased")
    state["device"] = 0
    calls.clear()
    with lease:
        entered = calls[:]
        calls.clear()
    report["lease"] = [entered, calls[:], state["device"], lease.released]
    print(json.dumps(report))
    """
)


def test_make_current_and_restore_current_leave_the_devices_right() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _RUN_ALONE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    report = __import__("json").loads(done.stdout)
    assert report["switch"] == [[["set_device", 1], ["use", "mine"]], 0, "previous-on-1"]
    assert report["restore"] == [[["use", "previous-on-1"], ["set_device", 0]], 0]
    # The stream is restored on the lease's device whatever the block left current.
    assert report["restore_from_elsewhere"] == [
        [["set_device", 1], ["use", "previous-on-1"], ["set_device", 0]],
        0,
    ]
    assert report["failed_switch"] == [
        [["set_device", 1], ["use", "broken"], ["set_device", 0]],
        0,
        "use broken failed",
    ]
    # A lease's with block makes the same two switches, from C.
    assert report["lease"] == [
        [["set_device", 1], ["use", "leased"]],
        [["use", "previous-on-1"], ["set_device", 0]],
        0,
        True,
    ]
    # The device goes back even though the stream could not.
    assert report["failed_restore"] == [
        [["use", "broken-previous"], ["set_device", 0]],
        0,
        "use broken-previous failed",
    ]


_PROBE_FALLBACK = textwrap.dedent(
    """
    # No driver call is installed in this process: a stream with a capture
    # handle must then release through Python's check, never skip it.
    from cupystreams import CudaStreamPool, LeaseError
    pool = CudaStreamPool(1, 0, 0, backend="host")
    lease = pool.acquire_compute()
    stream = lease.stream
    stream._capture_handle = 12345
    stream._capturing = lambda: 1
    try:
        lease.release()
        print("released while capturing")
    except LeaseError as exc:
        print("refused:", exc)
    stream._capturing = lambda: 0
    lease.release()
    print("released:", lease.released, pool.stats().compute.leased)
    """
)


def test_without_the_driver_call_the_capture_check_runs_in_python() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE_FALLBACK], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused:") and "still capturing" in lines[0], done.stdout
    assert lines[1] == "released: True 0", done.stdout


_COLLECTOR_MEDDLES = textwrap.dedent(
    """
    # Every allocation starts a collection, and every collection acquires or
    # releases an event and a lease of the same pool: Python code running in
    # the middle of the C fast paths' own allocations.
    import gc
    from cupystreams import CudaStreamPool

    pool = CudaStreamPool(2, 1, 1, backend="host", event_pool_size=4)
    events = pool.events
    held_events, held_leases = [], []

    def meddle(phase, info):
        if phase != "start":
            return
        if held_events:
            events.release(held_events.pop())
            held_leases.pop().release()
        else:
            held_events.append(events.acquire())
            held_leases.append(pool.acquire_compute())

    gc.callbacks.append(meddle)
    gc.set_threshold(1)
    try:
        for _ in range(3000):
            events.release(events.acquire())
            pool.acquire_compute().release()
    finally:
        gc.callbacks.remove(meddle)
        gc.set_threshold(700)
    for event in held_events:
        event.release()
    for lease in held_leases:
        lease.release()
    handles = [id(handle) for handle, _ in events._idle]
    streams = [id(stream) for stream in pool._compute.idle]
    print(len(handles) == len(set(handles)), len(streams) == len(set(streams)) == 2,
          pool.stats().compute.leased, events.stats().in_use)
    """
)


def test_a_collection_inside_the_fast_path_takes_nothing_twice() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _COLLECTOR_MEDDLES], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "0", "0"], done.stdout


def test_an_enter_inside_an_enter_is_refused_and_undone(
    host_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = host_pool._backend
    real_enter = backend.enter
    lease = host_pool.acquire_compute()
    stream = lease.stream
    before = sys.getrefcount(stream)

    def enter_again(handle: object) -> object:
        lease.__enter__()  # e.g. from a finalizer or another thread, mid-switch
        return real_enter(handle)

    monkeypatch.setattr(backend, "enter", enter_again)
    with pytest.raises(LeaseError, match="entered once"):
        lease.__enter__()
    monkeypatch.setattr(backend, "enter", real_enter)
    assert backend.current_stream() is None  # nothing half-entered
    with lease:
        assert backend.current_stream() is stream._handle
    assert lease.released and sys.getrefcount(stream) == before


def test_exit_takes_exactly_three_arguments(pool: CudaStreamPool) -> None:
    lease = pool.acquire_compute()
    with pytest.raises(TypeError, match="3 arguments"):
        lease.__exit__()  # type: ignore[call-arg]
    assert not lease.released
    lease.__exit__(None, None, None)
    assert lease.released


def test_a_bad_capture_handle_is_refused_and_the_old_one_kept(pool: CudaStreamPool) -> None:
    stream = pool._streams[0]
    before = stream._capture_handle
    for bad in (-1, 2**64, "x", None):
        with pytest.raises((TypeError, OverflowError)):
            stream._capture_handle = bad  # type: ignore[assignment]
        assert stream._capture_handle == before
    pool.acquire_compute().release()


def test_a_released_event_keeps_no_backend_event(pool: CudaStreamPool) -> None:
    event = pool.events.acquire()
    handle = event.event
    event.release()
    assert event._handle is None
    assert any(idle is handle for idle, _ in pool.events._idle)
    with pytest.raises(LeaseError, match="released"):
        _ = event.event


def test_a_dropped_lease_returns_even_when_its_warning_is_an_error(
    host_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        lease = host_pool.acquire_compute()
        del lease
    assert host_pool.stats().compute.leased == 0
    assert [type(r.exc_value) for r in reported] == [ResourceWarning]


def test_a_hand_off_keeps_its_stream_from_a_lock_free_acquire(host_pool: CudaStreamPool) -> None:
    """The moment the last waiter leaves the queue, a lock-free acquire on
    another thread may take an idle stream: the hand-off must hold its stream
    by then. Here the acquire runs exactly at that moment."""
    from collections import deque

    from cupystreams import PoolExhaustedError
    from cupystreams._lanes import _Waiter

    lane = host_pool._compute
    taken: list[Any] = []

    class Waiters(deque[Any]):
        def popleft(self) -> Any:
            waiter = super().popleft()
            try:
                taken.append(host_pool.acquire_compute(blocking=False))
            except PoolExhaustedError:
                taken.append(None)
            return waiter

    held = [host_pool.acquire_compute() for _ in range(lane.capacity)]
    waiter = _Waiter()
    lane.waiters = Waiters([waiter])
    held.pop().release()  # hands the stream to the waiter, under the pool's lock
    assert taken == [None] and waiter.stream is not None and waiter.ready.is_set()
    lane.waiters = deque()
    lane.give_back(waiter.stream)
    for lease in held:
        lease.release()
