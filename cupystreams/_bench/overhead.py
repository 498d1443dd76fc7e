"""What a lease and an event cost, next to creating streams and events raw.

Every figure is the median of many batches after a warm-up batch, all rows
timed in the same interleaved rounds, so that the pool and its peers see the
same machine state; the goals are ratios within that one run.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable

from .. import CudaStreamPool
from .common import Result, interleaved_us_per_op

__all__ = ["GOALS", "lease_overhead", "thread_scaling"]


# One measured row: its id, its name, its batch, operations per batch, its note.
_Row = tuple[str, str, Callable[[int], None], int, str]

#: (id of the ratio, numerator row, denominator row, the most it may be).
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("goal.acquire_release_vs_torch_stream", "lease.acquire_release", "peer.torch_stream", 1.0),
    ("goal.with_vs_cupy_with", "lease.with", "peer.cupy_with", 2.0),
    ("goal.same_key_vs_plain", "lease.same_key", "lease.acquire_release", 1.5),
    ("goal.two_keys_vs_plain", "lease.two_keys", "lease.acquire_release", 1.5),
    ("goal.timeout_vs_plain", "lease.acquire_release_timeout", "lease.acquire_release", 1.2),
    ("goal.compute_context_vs_with", "lease.compute_context", "lease.with", 1.2),
    ("goal.event_cycle_vs_cupy_event", "lease.event_cycle", "peer.cupy_event", 0.3),
)


def _sizes(quick: bool) -> tuple[int, int]:
    """(operations per batch, rounds) for the cheap operations."""
    return (2_000, 7) if quick else (20_000, 31)


def lease_overhead(backend: str, quick: bool) -> list[Result]:
    """Uncontended lease and event costs, with raw CuPy and torch side by side,
    and the ratios the library's speed goals are stated in."""
    number, repeats = _sizes(quick)
    with CudaStreamPool(backend=backend) as pool:
        rows = _pool_rows(pool, backend, number)
        peers, missing = _peer_rows(backend, number)
        rows += peers
        batches = {row_id: (batch, n) for row_id, _, batch, n, _ in rows}
        us = interleaved_us_per_op(batches, repeats)
    group = {"lease": "lease", "peer": "peer"}
    measured = [
        Result(group[row_id.split(".")[0]], name, us[row_id], "µs", note, id=row_id)
        for row_id, name, _, _, note in rows
    ]
    return measured + missing + _ratios(us)


def _ratios(us: dict[str, float]) -> list[Result]:
    results = []
    for goal_id, top, bottom, most in GOALS:
        name = f"{top} / {bottom}"
        if top not in us or bottom not in us:
            results.append(Result("goal", name, None, "x", "a row is missing here", id=goal_id))
            continue
        ratio = us[top] / us[bottom]
        verdict = "met" if ratio <= most else "NOT met"
        note = f"goal <= {most:g}: {verdict}"
        results.append(Result("goal", name, ratio, "x", note, {"goal": most}, id=goal_id))
    return results


def _pool_rows(pool: CudaStreamPool, backend: str, number: int) -> list[_Row]:
    acquire = pool.acquire_compute
    context = pool.compute_context
    acquire_event, release_event = pool.events.acquire, pool.events.release

    def acquire_release(n: int) -> None:
        for _ in range(n):
            acquire().release()

    def acquire_release_timeout(n: int) -> None:
        for _ in range(n):
            acquire(timeout=10).release()

    def same_key(n: int) -> None:
        for _ in range(n):
            acquire("k").release()

    def two_keys(n: int) -> None:
        for _ in range(n // 2):
            acquire("a").release()
            acquire("b").release()

    def with_block(n: int) -> None:
        for _ in range(n):
            with acquire():
                pass

    def context_block(n: int) -> None:
        for _ in range(n):
            with context():
                pass

    def event_cycle(n: int) -> None:
        for _ in range(n):
            release_event(acquire_event())

    note = f"{backend} backend"
    return [
        ("lease.acquire_release", "acquire_compute().release()", acquire_release, number, note),
        (
            "lease.acquire_release_timeout",
            "acquire_compute(timeout=10).release()",
            acquire_release_timeout,
            number,
            note,
        ),
        ("lease.same_key", "acquire_compute('k').release()", same_key, number, note),
        ("lease.two_keys", "keys 'a' and 'b' in turn", two_keys, number, note),
        ("lease.with", "with acquire_compute():", with_block, number, note),
        ("lease.compute_context", "with compute_context():", context_block, number, note),
        ("lease.event_cycle", "events.acquire() + release", event_cycle, number, note),
    ]


def _peer_rows(backend: str, number: int) -> tuple[list[_Row], list[Result]]:
    """The raw peers' rows, and a result without a figure for each peer missing here."""
    names = {
        "peer.cupy_stream": "cupy.cuda.Stream() create + destroy",
        "peer.cupy_event": "cupy.cuda.Event() create + destroy",
        "peer.cupy_with": "with cupy_stream: (CuPy's own switch)",
        "peer.torch_stream": "torch.cuda.Stream()",
    }
    if backend != "cupy":
        reason = "needs a GPU (host backend run)"
        return [], [Result("peer", name, None, "µs", reason, id=i) for i, name in names.items()]
    import cupy

    costly = number // 20  # creating a stream costs 10-40 times a lease
    stream_type, event_type = cupy.cuda.Stream, cupy.cuda.Event

    def streams(n: int) -> None:
        for _ in range(n):
            stream_type(non_blocking=True)  # destroyed as the reference drops

    def events(n: int) -> None:
        for _ in range(n):
            event_type(disable_timing=True)

    prebuilt = stream_type(non_blocking=True)

    def switches(n: int) -> None:
        for _ in range(n):
            with prebuilt:
                pass

    rows: list[_Row] = [
        ("peer.cupy_stream", names["peer.cupy_stream"], streams, costly, "a lease replaces it"),
        ("peer.cupy_event", names["peer.cupy_event"], events, costly, "an event reuse replaces it"),
        ("peer.cupy_with", names["peer.cupy_with"], switches, number, "the floor under `with`"),
    ]
    torch_row = _torch_stream_row(names["peer.torch_stream"], number)
    if isinstance(torch_row, Result):
        return rows, [torch_row]
    return [*rows, torch_row], []


def _torch_stream_row(name: str, number: int) -> _Row | Result:
    """The ``torch.cuda.Stream()`` row, or why it cannot be measured here."""
    if importlib.util.find_spec("torch") is None:
        return Result("peer", name, None, "µs", "torch is not installed", id="peer.torch_stream")
    import torch

    if not torch.cuda.is_available():
        return Result("peer", name, None, "µs", "torch sees no GPU", id="peer.torch_stream")
    make = torch.cuda.Stream

    def batch(n: int) -> None:
        for _ in range(n):
            make()  # torch's round-robin pool: no exclusivity, nothing destroyed

    note = f"torch {torch.__version__}: its own pool, no exclusive use"
    return ("peer.torch_stream", name, batch, number, note)


def _threads_ops_per_s(threads: int, per_thread: int, body: Callable[[int], None]) -> float:
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        body(per_thread)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * per_thread / (time.perf_counter() - start)


def _lease_loop(pool: CudaStreamPool) -> Callable[[int], None]:
    acquire = pool.acquire_compute

    def leases(n: int) -> None:
        for _ in range(n):
            acquire().release()

    return leases


def thread_scaling(backend: str, quick: bool) -> list[Result]:
    """Lease throughput from 1 and 8 threads: on 4 streams (8 threads wait), and on 8."""
    per_thread = 2_000 if quick else 20_000
    results = []
    rates = {}
    for threads, streams in ((1, 4), (8, 4), (8, 8)):
        with CudaStreamPool(streams, 0, 0, backend=backend) as pool:
            leases = _lease_loop(pool)
            leases(per_thread // 10)  # warm-up
            rates[threads, streams] = rate = _threads_ops_per_s(threads, per_thread, leases)
        waiting = "; threads wait for streams" if threads > streams else ""
        results.append(
            Result(
                "threads",
                f"acquire+release, {threads} thread(s), {streams} streams",
                rate / 1e6,
                "M ops/s",
                f"{backend} backend; {1e6 / rate:.2f} µs per op overall{waiting}",
                id=f"threads.t{threads}_s{streams}",
            )
        )
    ratio = rates[8, 4] / rates[1, 4]
    results.append(
        Result(
            "goal",
            "8 threads on 4 streams / 1 thread, throughput",
            ratio,
            "x",
            f"goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'}",
            {"goal_at_least": 0.5},
            id="goal.eight_threads_vs_one",
        )
    )
    if backend == "cupy":
        import cupy

        stream_type = cupy.cuda.Stream
        device = cupy.cuda.runtime.getDevice()

        def new_streams(n: int) -> None:
            cupy.cuda.runtime.setDevice(device)  # new threads start on device 0
            for _ in range(n):
                stream_type(non_blocking=True)

        count = 200 if quick else 2_000
        for threads in (1, 8):
            rate = _threads_ops_per_s(threads, count, new_streams)
            results.append(
                Result(
                    "threads",
                    f"cupy.cuda.Stream() create+destroy, {threads} thread(s)",
                    rate / 1e6,
                    "M ops/s",
                    f"raw peer; {1e6 / rate:.2f} µs per op overall",
                    id=f"threads.cupy_stream_t{threads}",
                )
            )
    return results
