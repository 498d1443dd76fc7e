"""What a lease and an event cost, next to creating streams and events raw.

Every figure is the median of many batches after a warm-up batch, measured in
one process so that the pool and its peers see the same machine state.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable

from .. import CudaStreamPool
from .common import Result, interleaved_us_per_op

__all__ = ["lease_overhead", "thread_scaling"]


# One measured row: its name, its batch, operations per batch, its note.
_Row = tuple[str, Callable[[int], None], int, str]


def _sizes(quick: bool) -> tuple[int, int]:
    """(operations per batch, batches) for the cheap operations."""
    return (2_000, 7) if quick else (20_000, 31)


def lease_overhead(backend: str, quick: bool) -> list[Result]:
    """Uncontended lease and event costs, with raw CuPy and torch side by side.

    Every row is timed in the same rounds (``interleaved_us_per_op``), so a
    lease and the raw call it replaces are compared under one machine state.
    """
    number, repeats = _sizes(quick)
    with CudaStreamPool(backend=backend) as pool:
        rows = _pool_rows(pool, backend, number)
        peers, missing = _raw_rows(backend, number)
        rows += peers
        us = interleaved_us_per_op({name: (batch, n) for name, batch, n, _ in rows}, repeats)
    measured = [Result("lease", name, us[name], "µs", note) for name, _, _, note in rows]
    return measured + missing


def _pool_rows(pool: CudaStreamPool, backend: str, number: int) -> list[_Row]:
    acquire = pool.acquire_compute
    acquire_event, release_event = pool.events.acquire, pool.events.release

    def acquire_release(n: int) -> None:
        for _ in range(n):
            acquire().release()

    def with_block(n: int) -> None:
        for _ in range(n):
            with acquire():
                pass

    def event_cycle(n: int) -> None:
        for _ in range(n):
            release_event(acquire_event())

    def without_capture_check(n: int) -> None:
        # What DESIGN semantic 8 costs each release: the same loop with the
        # graph-capture check switched off for the batch.
        streams = pool._streams
        handles = [stream._capture_handle for stream in streams]
        for stream in streams:
            stream._capture_handle = 0
        try:
            acquire_release(n)
        finally:
            for stream, handle in zip(streams, handles, strict=True):
                stream._capture_handle = handle

    note = f"{backend} backend; "
    rows: list[_Row] = [
        ("pool.acquire_compute().release()", acquire_release, number, note + "goal < 0.6 µs"),
        ("with pool.acquire_compute():", with_block, number, note + "goal < 1.5 µs"),
        ("events.acquire() + release", event_cycle, number, note + "goal < 0.4 µs"),
    ]
    if any(stream._capture_handle for stream in pool._streams):
        rows.append(
            (
                "  the same without the graph-capture check",
                without_capture_check,
                number,
                note + "cuStreamIsCapturing skipped, for comparison",
            )
        )
    return rows


_RAW_NAMES = (
    "cupy.cuda.Stream() create + destroy",
    "cupy.cuda.Event() create + destroy",
    "with cupy_stream: (CuPy's own switch)",
)
_TORCH_NAME = "torch.cuda.Stream()"


def _raw_rows(backend: str, number: int) -> tuple[list[_Row], list[Result]]:
    """The raw peers' rows, and a result without a figure for each peer missing here."""
    if backend != "cupy":
        reason = "needs a GPU (host backend run)"
        names = (*_RAW_NAMES, _TORCH_NAME)
        return [], [Result("lease", name, None, "µs", reason) for name in names]
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

    stream_name, event_name, switch_name = _RAW_NAMES
    rows: list[_Row] = [
        (stream_name, streams, costly, "raw peer of a lease"),
        (event_name, events, costly, "raw peer of an event acquire"),
        (
            switch_name,
            switches,
            number,
            "a prebuilt stream made current and back: the floor under a lease's with",
        ),
    ]
    torch_row = _torch_stream_row(number)
    if isinstance(torch_row, Result):
        return rows, [torch_row]
    return [*rows, torch_row], []


def _torch_stream_row(number: int) -> _Row | Result:
    """The ``torch.cuda.Stream()`` row, or why it cannot be measured here."""
    if importlib.util.find_spec("torch") is None:
        return Result("lease", _TORCH_NAME, None, "µs", "torch is not installed")
    import torch

    if not torch.cuda.is_available():
        return Result("lease", _TORCH_NAME, None, "µs", "torch sees no GPU")
    make = torch.cuda.Stream

    def batch(n: int) -> None:
        for _ in range(n):
            make()  # torch's round-robin pool: no exclusivity, nothing destroyed

    note = f"torch {torch.__version__}: its own pool, no exclusive use"
    return (_TORCH_NAME, batch, number, note)


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
    for threads, streams in ((1, 4), (8, 4), (8, 8)):
        with CudaStreamPool(streams, 0, 0, backend=backend) as pool:
            leases = _lease_loop(pool)
            leases(per_thread // 10)  # warm-up
            rate = _threads_ops_per_s(threads, per_thread, leases)
        waiting = "; threads wait for streams" if threads > streams else ""
        results.append(
            Result(
                "threads",
                f"acquire+release, {threads} thread(s), {streams} streams",
                rate / 1e6,
                "M ops/s",
                f"{backend} backend; {1e6 / rate:.2f} µs per op overall{waiting}",
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
                )
            )
    return results
