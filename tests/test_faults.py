"""Faults: exceptions and interrupts at every stage of a lease, failing host functions,
close() under load, a faulting CUDA kernel, and fork while leases are out.

After each fault the pool must have lost nothing: no stream, no waiter left in
a queue, no event, no thread (the ``no_leaks`` fixture counts them).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from reliability_helpers import (
    no_leaks,
    record_figures,
    run_threads,
    switch_interval,
    wait_until,
)

from cupystreams import (
    CudaStreamPool,
    PoolClosedError,
    PoolTimeoutError,
    StreamLease,
    compute_stream,
    get_global_stream_pool,
    reset_global_pool,
)

KINDS = ("compute", "comm", "high_priority")


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    with no_leaks():
        yield


def acquire(pool: CudaStreamPool, kind: str, **kwargs: Any) -> StreamLease:
    lease: StreamLease = getattr(pool, f"acquire_{kind}")(**kwargs)
    return lease


def assert_all_idle(pool: CudaStreamPool) -> None:
    """Nothing leased, nobody queued, and every stream can be leased at once."""
    stats = pool.stats()
    assert (stats.leased, stats.waiting) == (0, 0), stats
    everything = [
        acquire(pool, kind, blocking=False)
        for kind in KINDS
        for _ in range(getattr(stats, kind).capacity)
    ]
    for lease in everything:
        lease.release()


def current_stream_marker(pool: CudaStreamPool) -> object:
    """Tells the calling thread's current stream apart, as far as the pool sees it."""
    if pool.backend == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().ptr
    try:
        pool.record_event().release()  # the host backend records on the current stream only
    except ValueError:
        return None
    return "some lease"


# -- exceptions and interrupts inside lease blocks ----------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("kind", KINDS)
def test_error_inside_a_lease_block_releases_and_restores(
    pool: CudaStreamPool, kind: str, error: type[BaseException]
) -> None:
    before = current_stream_marker(pool)
    with (
        pytest.raises(error),
        acquire(pool, kind) as outer,
        acquire(pool, "compute", affinity_key="k") as inner,
    ):
        inner.launch_host_func(lambda: None)
        raise error("raised inside two nested lease blocks")
    assert outer.released and inner.released
    assert current_stream_marker(pool) == before
    assert_all_idle(pool)
    with pool.acquire_compute(affinity_key="k", blocking=False):
        pass  # the key was freed too


# -- interrupts while waiting in acquire -----------------------------------------------


class Interrupter:
    """Delivers KeyboardInterrupt to the main thread, as Ctrl-C would, through SIGUSR1.

    SIGUSR1 instead of SIGINT keeps pytest's own Ctrl-C handling out of the way.
    """

    def __init__(self) -> None:
        self.delivered = threading.Event()
        self._previous: Any = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.delivered.set()
        raise KeyboardInterrupt("injected by the test")

    def __enter__(self) -> Interrupter:
        assert threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGUSR1, self._handler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGUSR1, self._previous)

    def send(self) -> None:
        """Interrupt the main thread (callable from any thread)."""
        main = threading.main_thread().ident
        assert main is not None
        signal.pthread_kill(main, signal.SIGUSR1)

    def send_when(self, condition: Callable[[], bool]) -> threading.Thread:
        def later() -> None:
            wait_until(condition, timeout=10, what="the main thread waits in acquire")
            self.send()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread

    def settle(self) -> int:
        """Wait until the interrupt was handled; return how many landed here."""
        landed = 0
        while not self.delivered.is_set():
            try:
                time.sleep(0.0005)
            except KeyboardInterrupt:
                landed += 1
        return landed


@pytest.mark.parametrize("where", ["stream-queue", "stream-queue-keyed", "key-held-elsewhere"])
def test_interrupt_while_waiting_leaves_no_trace(backend: str, where: str) -> None:
    with CudaStreamPool(1, 1, 0, backend=backend) as pool, Interrupter() as interrupter:
        key = None if where == "stream-queue" else "k"
        release_key = threading.Event()
        if where == "key-held-elsewhere":

            def hold_key() -> None:
                with pool.acquire_comm(affinity_key="k"):
                    release_key.wait(30)

            holder = threading.Thread(target=hold_key, daemon=True)
            holder.start()
            wait_until(lambda: pool.stats().comm.leased == 1, timeout=10, what="the key is held")
            # A thread blocked on a key is invisible in stats() (see test_stress), so
            # give it time to block; an earlier interrupt must leave no trace either.
            start = time.monotonic()
            sender = interrupter.send_when(lambda: time.monotonic() - start > 0.2)
            blocker = None
        else:
            blocker = pool.acquire_compute()  # the only compute stream
            sender = interrupter.send_when(lambda: pool.stats().compute.waiting == 1)
        with pytest.raises(KeyboardInterrupt):
            pool.acquire_compute(affinity_key=key, timeout=30)
        sender.join(10)
        interrupter.settle()
        stats = pool.stats()
        assert stats.waiting == 0, f"the interrupted waiter stayed queued: {stats}"
        if blocker is not None:
            blocker.release()
        else:
            release_key.set()
            holder.join(10)
        assert_all_idle(pool)
        with pool.acquire_compute(affinity_key="k", blocking=False):
            pass  # the interrupted acquire did not keep the key reserved


def test_interrupts_at_random_moments_lose_nothing(backend: str) -> None:
    """Interrupt acquire at random points around a hand-off, many times over."""
    rounds = 300
    rng = random.Random(int(os.environ.get("CUPYSTREAMS_STRESS_SEED") or 1))
    landed = {"in acquire": 0, "after acquire": 0, "served": 0}
    with (
        CudaStreamPool(1, 0, 0, backend=backend) as pool,
        Interrupter() as interrupter,
        warnings.catch_warnings(),
    ):
        # An interrupt between acquire's return and the assignment drops the lease,
        # which returns through the garbage collector with a ResourceWarning.
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(rounds):
            interrupter.delivered.clear()
            holder = pool.acquire_compute()
            key = rng.choice((None, "k"))
            release_after, interrupt_after = rng.uniform(0, 0.003), rng.uniform(0, 0.003)

            def release_later(lease: StreamLease = holder, delay: float = release_after) -> None:
                time.sleep(delay)
                lease.release()

            def interrupt_later(delay: float = interrupt_after) -> None:
                time.sleep(delay)
                interrupter.send()

            threads = [threading.Thread(target=f) for f in (release_later, interrupt_later)]
            got: StreamLease | None = None
            # The one interrupt of the round may land on any bytecode from the
            # interrupter's start to the end of settle(); one that escaped would
            # stop the whole pytest run.
            try:
                for t in threads:
                    t.start()
                try:
                    got = pool.acquire_compute(affinity_key=key, timeout=10)
                except KeyboardInterrupt:
                    landed["in acquire"] += 1
                landed["after acquire"] += interrupter.settle()
            except KeyboardInterrupt:
                landed["after acquire"] += 1
            for t in threads:
                t.join()
            if got is not None:
                landed["served"] += 1
                got.release()
            wait_until(
                lambda: pool.stats().leased == 0, timeout=10, what="dropped leases came back"
            )
            assert pool.stats().waiting == 0
            pool.acquire_compute(affinity_key="k", blocking=False).release()
    record_figures("random-interrupts", backend=backend, rounds=rounds, **landed)


# -- failures inside the pool's own device calls ------------------------------------


def fail_to_move_a_key(
    pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch, first_work: Callable[[], object]
) -> tuple[StreamLease, object]:
    """Lease key "k" (``first_work`` queued on it), let another holder take its stream
    (the key's end is recorded, and the key must move), then acquire "k" with
    cudaStreamWaitEvent failing (injected): the acquire raises.

    Returns the holder of the key's first stream, and that stream. The pool has
    two compute streams.
    """
    with pool.acquire_compute(affinity_key="k") as first:
        first.launch_host_func(first_work)
        first_stream = first.stream
    blocker, other = pool.acquire_compute(), pool.acquire_compute()
    if blocker.stream is not first_stream:
        blocker, other = other, blocker
    other.release()

    def failing_wait(stream: object, event: object) -> None:
        raise RuntimeError("injected: cudaStreamWaitEvent failed")

    monkeypatch.setattr(pool._backend, "wait_event", failing_wait)
    with pytest.raises(RuntimeError, match="injected"):
        pool.acquire_compute(affinity_key="k")
    monkeypatch.undo()
    return blocker, first_stream


def test_failed_device_wait_in_a_keyed_acquire_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cudaStreamWaitEvent failing while a key moves streams: the acquire raises, and
    the stream and the key are free again."""
    with CudaStreamPool(2, 0, 0, backend="host") as pool:
        blocker, _ = fail_to_move_a_key(pool, monkeypatch, lambda: None)
        blocker.release()
        assert pool.stats().leased == 0, "the stream taken for the failed acquire was lost"
        with pool.acquire_compute(affinity_key="k", blocking=False):
            pass  # the key is not left reserved by the failed acquire
        assert_all_idle(pool)


def test_failed_device_wait_in_a_keyed_acquire_keeps_the_keys_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cudaStreamWaitEvent failing while a key moves streams must not lose the key's
    recorded end: the key's next lease, on the other stream, still waits for the work
    of its earlier lease."""
    gate = threading.Event()  # holds the key's earlier work back
    with CudaStreamPool(2, 0, 0, backend="host") as pool:
        try:
            blocker, first_stream = fail_to_move_a_key(pool, monkeypatch, gate.wait)
            with pool.acquire_compute(affinity_key="k") as second:
                assert second.stream is not first_stream
                assert not second.query(), "the key's new stream does not wait for its earlier work"
                gate.set()
                second.synchronize()
            blocker.release()
        finally:
            gate.set()


def test_failed_record_of_a_keys_end_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaEventRecord failing when a key's stream goes to another holder (the moment
    the key's end is recorded): that acquire raises, the stream stays idle and still
    the key's, and the next acquire succeeds. No event is stranded."""
    with CudaStreamPool(1, 0, 0, backend="host") as pool:
        in_use = pool.stats().events.in_use
        with pool.acquire_compute(affinity_key="k") as lease:
            keyed = lease.stream
        record = pool._backend.record

        def failing_record(event: object, stream: object) -> None:
            raise RuntimeError("injected: cudaEventRecord failed")

        monkeypatch.setattr(pool._backend, "record", failing_record)
        with pytest.raises(RuntimeError, match="injected"):
            pool.acquire_compute()  # not the key's: the key's end must be recorded first
        assert pool.stats().compute.idle == 1
        assert pool.stats().events.in_use == in_use, pool.stats().events
        assert keyed._unrecorded_key is not None, "the key lost its claim on the stream"
        monkeypatch.setattr(pool._backend, "record", record)
        with pool.acquire_compute() as other:
            assert other.stream is keyed
        assert pool.stats().key_events == 1  # recorded this time, held for the key
        with pool.acquire_compute(affinity_key="k") as again:
            assert again.stream is keyed
        assert pool.stats().events.in_use == in_use


# -- host functions that raise ---------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_host_function_error_is_raised_by_the_next_synchronize(
    pool: CudaStreamPool, error: type[BaseException]
) -> None:
    ran: list[str] = []
    raised = error("from a host function")

    def fail() -> None:
        raise raised

    with pool.acquire_compute() as lease:
        lease.launch_host_func(fail)
        lease.launch_host_func(lambda: ran.append("after"))
        with pytest.raises(error) as info:
            lease.synchronize()
        assert info.value is raised
        lease.synchronize()  # raised once, not again
        lease.launch_host_func(lambda: ran.append("still works"))
        lease.synchronize()
    assert ran == ["after", "still works"]
    assert_all_idle(pool)


def test_sync_all_waits_for_every_stream_even_when_one_failed(pool: CudaStreamPool) -> None:
    """sync_all() may report a host function's error, but only after every stream's
    work is done: "block until the work on every pool stream is done"."""
    leases = [pool.acquire_compute(), pool.acquire_compute(), pool.acquire_comm()]
    leases.sort(key=lambda lease: lease.stream.stream_id)
    first, last = leases[0], leases[-1]
    finished: list[str] = []

    def fail() -> None:
        raise ValueError("from a host function on the first stream")

    first.launch_host_func(fail)
    last.launch_host_func(lambda: (time.sleep(0.2), finished.append("slow work")))
    for lease in leases:
        lease.release()
    with pytest.raises(ValueError, match="first stream"):
        pool.sync_all()
    assert finished == ["slow work"], "sync_all() returned while a stream was still busy"


# -- close() under load ------------------------------------------------------------------


def test_close_while_threads_hold_and_wait(backend: str) -> None:
    pool = CudaStreamPool(2, 1, 0, backend=backend)
    holders_ready = threading.Barrier(4)  # 3 holders + the test
    resume = threading.Event()
    work_done: list[int] = []
    outcomes: dict[str, str] = {}

    def hold(kind: str, key: str | None, i: int) -> None:
        with acquire(pool, kind, **({"affinity_key": key} if key else {})) as lease:
            lease.launch_host_func(lambda: (time.sleep(0.2), work_done.append(i)))
            holders_ready.wait()
            resume.wait(30)
            for name, use in (
                ("synchronize", lease.synchronize),
                ("record_event", lease.record_event),
                ("launch_host_func", lambda: lease.launch_host_func(lambda: None)),
            ):
                try:
                    use()
                    outcomes[f"holder{i}.{name}"] = "no error"
                except PoolClosedError:
                    outcomes[f"holder{i}.{name}"] = "PoolClosedError"
        outcomes[f"holder{i}.exit"] = "released" if lease.released else "still leased"

    def wait(kind: str, key: str | None, i: int) -> None:
        start = time.monotonic()
        try:
            acquire(pool, kind, timeout=60, **({"affinity_key": key} if key else {})).release()
            outcomes[f"waiter{i}"] = "served"
        except PoolClosedError:
            outcomes[f"waiter{i}"] = "PoolClosedError"
        outcomes[f"waiter{i}.seconds"] = f"{time.monotonic() - start:.3f}"

    holders = [
        threading.Thread(target=hold, args=args, daemon=True)
        for args in (("compute", "a", 0), ("compute", None, 1), ("comm", "b", 2))
    ]
    for t in holders:
        t.start()
    holders_ready.wait(30)
    waiters = [
        threading.Thread(target=wait, args=args, daemon=True)
        for args in (("compute", None, 0), ("comm", "c", 1), ("compute", "a", 2))
    ]
    for t in waiters:
        t.start()
    wait_until(lambda: pool.stats().waiting >= 2, timeout=10, what="two waiters are queued")
    time.sleep(0.05)  # the keyed waiter blocks on its key, out of sight of stats()
    pool.close()
    assert sorted(work_done) == [0, 1, 2], "close() returned before the leases' work ran"
    for t in waiters:
        t.join(5)
    assert not any(t.is_alive() for t in waiters), "a waiter was not woken by close()"
    resume.set()
    for t in holders:
        t.join(10)
    assert not any(t.is_alive() for t in holders), "a holder hung after close()"
    expected = {f"waiter{i}": "PoolClosedError" for i in range(3)}
    for i in range(3):
        expected[f"holder{i}.exit"] = "released"
        for name in ("synchronize", "record_event", "launch_host_func"):
            expected[f"holder{i}.{name}"] = "PoolClosedError"
    assert {k: v for k, v in outcomes.items() if not k.endswith("seconds")} == expected


def test_close_right_after_a_hand_off_gives_no_live_lease_on_a_dead_stream(
    backend: str,
) -> None:
    """A waiter handed a stream just before close() must not come out holding a lease
    whose stream close() destroyed: it gets PoolClosedError, then or at first use."""
    rounds = 20
    for _ in range(rounds):
        pool = CudaStreamPool(1, 0, 0, backend=backend)
        holder = pool.acquire_compute()
        result: dict[str, object] = {}

        def wait(pool: CudaStreamPool = pool, result: dict[str, object] = result) -> None:
            try:
                result["lease"] = pool.acquire_compute(timeout=30)
            except PoolClosedError:
                result["error"] = "PoolClosedError"

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        wait_until(lambda p=pool: p.stats().compute.waiting == 1, timeout=10, what="queued")
        holder.release()  # hands the stream to the waiter ...
        pool.close()  # ... and closes before the waiter has run
        waiter.join(10)
        assert not waiter.is_alive()
        lease = result.get("lease")
        if isinstance(lease, StreamLease):
            outcome: list[str] = []

            def use(lease: StreamLease = lease, outcome: list[str] = outcome) -> None:
                try:
                    lease.synchronize()
                    outcome.append("synchronize worked on a closed pool's stream")
                except PoolClosedError:
                    outcome.append("PoolClosedError")

            user = threading.Thread(target=use, daemon=True)
            user.start()
            user.join(5)
            assert outcome == ["PoolClosedError"], (
                f"{lease!r} from a closed pool: synchronize() "
                f"{'hung' if user.is_alive() else outcome[0]}"
            )
            lease.release()
        assert pool.stats().closed


def test_close_cannot_destroy_a_stream_while_its_release_asks_if_it_is_capturing(
    backend: str,
) -> None:
    """A release asks the device whether its stream is capturing; a close() on
    another thread must not destroy the stream in the middle of that query."""
    with CudaStreamPool(1, 0, 0, backend=backend) as pool:
        lease = pool.acquire_compute()
        stream = lease.stream
        seen: list[bool] = []
        closer = threading.Thread(target=pool.close, daemon=True)
        query = stream._capture_probe
        assert query is not None

        def slow_query() -> int:
            closer.start()  # close() begins while the query runs ...
            closer.join(0.3)
            seen.append(stream._handle is not None)  # ... and must not have destroyed it
            return query()

        stream._capture_probe = slow_query
        try:
            lease.release()
        finally:
            stream._capture_probe = query
        closer.join(10)
        assert seen == [True], "the stream was destroyed during its capture query"
        assert not closer.is_alive() and pool.closed


def test_close_at_random_moments_under_load(backend: str) -> None:
    """Threads lease, work and wait while close() lands at a random moment: every
    thread finishes promptly, and every failure is PoolClosedError."""
    rounds, threads = 30, 8
    rng = random.Random(int(os.environ.get("CUPYSTREAMS_STRESS_SEED") or 2))
    closed_errors = 0
    with switch_interval(1e-5):
        for _ in range(rounds):
            pool = CudaStreamPool(2, 1, 1, backend=backend)
            errors: list[BaseException] = []

            def churn(seed: int, pool: CudaStreamPool = pool, errors: list[Any] = errors) -> None:
                r = random.Random(seed)
                while True:
                    kind = r.choice(KINDS)
                    key = r.choice((None, "a", "b")) if kind != "high_priority" else None
                    kwargs: dict[str, Any] = {"timeout": r.choice((None, 0.01))}
                    if key is not None:
                        kwargs["affinity_key"] = key
                    try:
                        with acquire(pool, kind, **kwargs) as lease:
                            lease.launch_host_func(lambda: time.sleep(0.0001))
                            if r.random() < 0.5:
                                lease.synchronize()
                            else:
                                lease.record_event().release()
                    except PoolTimeoutError:
                        continue
                    except PoolClosedError as exc:
                        errors.append(exc)
                        return

            seeds = [rng.randrange(2**32) for _ in range(threads)]
            workers = [lambda s=seed: churn(s) for seed in seeds]
            closer = threading.Timer(rng.uniform(0.0, 0.05), pool.close)
            closer.start()
            run_threads(workers, timeout=30, what="close-under-load")
            closer.join()
            closed_errors += len(errors)
            assert pool.closed
    record_figures(
        "close-under-load",
        backend=backend,
        rounds=rounds,
        threads=threads,
        pool_closed_errors=closed_errors,
    )


# -- a CUDA kernel that faults ----------------------------------------------------------

_ILLEGAL_ADDRESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import cupy
    from cupystreams import CudaStreamPool, PoolClosedError

    report = {}

    def outcome(call):
        try:
            call()
            return "ok"
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"

    # Fail loudly instead of hanging the test run.
    watchdog = threading.Timer(90, lambda: (print(json.dumps({"hang": report}), flush=True),
                                            __import__("os")._exit(3)))
    watchdog.daemon = True
    watchdog.start()

    poke = cupy.RawKernel(
        'extern "C" __global__ void poke(int* p) { p[threadIdx.x] = 1; }', "poke"
    )
    pool = CudaStreamPool(2, 1, 1, backend="cupy")
    lease = pool.acquire_compute()
    other = pool.acquire_comm()
    with lease.cupy_stream:
        poke((1,), (32,), (cupy.uint64(0x10),))  # writes to address 16: illegal
    report["synchronize"] = outcome(lease.synchronize)
    report["other_stream"] = outcome(other.synchronize)
    report["release"] = outcome(lease.release)
    report["release_other"] = outcome(other.release)
    start = time.monotonic()
    report["close"] = outcome(pool.close)
    report["close_seconds"] = time.monotonic() - start
    report["close_again"] = outcome(pool.close)
    report["closed"] = pool.closed
    report["acquire_after_close"] = outcome(pool.acquire_compute)
    report["events_after_close"] = outcome(pool.events.acquire)
    print(json.dumps(report), flush=True)
    """
)


@pytest.mark.gpu
def test_illegal_address_kernel_is_reported_and_close_does_not_hang() -> None:
    """Runs in a subprocess: an illegal-address fault poisons the CUDA context for good."""
    done = subprocess.run(
        [sys.executable, "-c", _ILLEGAL_ADDRESS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (rc {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1])
    shown = json.dumps(report, indent=1)
    assert "hang" not in report, f"hung after: {shown}"
    assert "illegal" in report["synchronize"].lower(), shown
    assert report["close"] == "ok" or "illegal" in report["close"].lower(), shown
    assert report["close_again"] == "ok", shown
    assert report["closed"] is True, shown
    assert report["acquire_after_close"].startswith("PoolClosedError"), shown
    # close() must finish closing even when the device reports the fault.
    assert report["events_after_close"].startswith("PoolClosedError"), shown
    assert done.returncode == 0, f"the interpreter did not exit cleanly: {done.stderr[-3000:]}"
    record_figures("illegal-address", **report)


# -- fork while leases are out ----------------------------------------------------------


def in_forked_child(child: Callable[[], dict[str, Any]], timeout: float = 60) -> dict[str, Any]:
    """Run ``child`` in a forked process and return the dict it returns."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a process with threads may deadlock the
        # child; the host backend's stream threads are such threads, and that is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            payload = json.dumps(child())
        except BaseException as exc:
            payload, code = json.dumps({"child crashed": repr(exc)}), 1
        os.write(write_end, payload.encode())
        os._exit(code)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], 0.1)
            if ready:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                data += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the forked child hung; it wrote {data!r}")
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
        return "ok"
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("global_backend", ["host", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_fork_while_leases_are_held(global_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUPYSTREAMS_BACKEND", global_backend)
    reset_global_pool()
    pool = CudaStreamPool(2, 1, 1, backend=global_backend)
    parent_global = get_global_stream_pool()
    lease = pool.acquire_compute()
    keyed = pool.acquire_comm(affinity_key="k")
    event = pool.events.acquire()

    def child() -> dict[str, Any]:
        report = {
            "closed": str(pool.closed),
            "acquire_compute": outcome(pool.acquire_compute),
            "acquire_comm": outcome(lambda: pool.acquire_comm(affinity_key="k")),
            "acquire_high_priority": outcome(pool.acquire_high_priority),
            "sync_all": outcome(pool.sync_all),
            "record_event": outcome(lambda: pool.record_event(lease)),
            "events.acquire": outcome(pool.events.acquire),
            "lease.synchronize": outcome(lease.synchronize),
            "lease.query": outcome(lease.query),
            "lease.wait": outcome(lambda: lease.wait(keyed)),
            "lease.launch_host_func": outcome(lambda: lease.launch_host_func(lambda: None)),
            "event.query": outcome(event.query),
            "lease.release": outcome(lease.release),
            "keyed.release": outcome(keyed.release),
            "close": outcome(pool.close),
        }
        if global_backend == "host":
            fresh = get_global_stream_pool()
            report["global_is_new"] = str(fresh is not parent_global)

            def use_global() -> None:
                with compute_stream("k") as s:
                    s.launch_host_func(lambda: None)
                    s.synchronize()

            report["global_use"] = outcome(use_global)
        return report

    report = in_forked_child(child)
    # The parent is untouched by its child.
    assert not pool.closed
    assert get_global_stream_pool() is parent_global
    lease.synchronize()
    lease.release()
    keyed.release()
    event.release()
    pool.close()
    reset_global_pool()

    assert report.pop("closed") == "True"
    for name in ("lease.release", "keyed.release", "close"):
        assert report.pop(name) == "ok", f"in the child, {name} should be a quiet no-op"
    if global_backend == "host":
        assert report.pop("global_is_new") == "True", "the child reused the parent's global pool"
        assert report.pop("global_use") == "ok"
    wrong = {
        name: text
        for name, text in report.items()
        if not (text.startswith("PoolClosedError") and "fork" in text)
    }
    assert wrong == {}, "in a forked child these must raise PoolClosedError naming fork"
