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
from .common import Result, median_us_per_op

__all__ = ["lease_overhead", "thread_scaling"]


def _sizes(quick: bool) -> tuple[int, int]:
    """(operations per batch, batches) for the cheap operations."""
    return (2_000, 7) if quick else (20_000, 31)


def lease_overhead(backend: str, quick: bool) -> list[Result]:
    """Uncontended lease and event costs, with raw CuPy and torch side by side."""
    number, repeats = _sizes(quick)
    results = []
    with CudaStreamPool(backend=backend) as pool:
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

        measured = [
            ("pool.acquire_compute().release()", acquire_release, "goal < 0.6 µs"),
            ("with pool.acquire_compute():", with_block, "goal < 1.5 µs"),
            ("events.acquire() + release", event_cycle, "goal < 0.4 µs"),
        ]
        for name, batch, note in measured:
            value = median_us_per_op(batch, number, repeats)
            results.append(Result("lease", name, value, "µs", f"{backend} backend; {note}"))
        if any(stream._capture_handle for stream in pool._streams):
            # The same loop with the graph-capture check skipped: the
            # difference is what DESIGN semantic 8 costs each release.
            handles = [stream._capture_handle for stream in pool._streams]
            for stream in pool._streams:
                stream._capture_handle = 0
            try:
                value = median_us_per_op(acquire_release, number, repeats)
            finally:
                for stream, handle in zip(pool._streams, handles, strict=True):
                    stream._capture_handle = handle
            results.append(
                Result(
                    "lease",
                    "  the same without the graph-capture check",
                    value,
                    "µs",
                    f"{backend} backend; cuStreamIsCapturing skipped, for comparison",
                )
            )
        return results + _raw_peers(backend, quick)


def _raw_peers(backend: str, quick: bool) -> list[Result]:
    if backend != "cupy":
        reason = "needs a GPU (host backend run)"
        return [
            Result("lease", "cupy.cuda.Stream() create + destroy", None, "µs", reason),
            Result("lease", "cupy.cuda.Event() create + destroy", None, "µs", reason),
            Result("lease", "with cupy_stream: (CuPy's own switch)", None, "µs", reason),
            Result("lease", "torch.cuda.Stream()", None, "µs", reason),
        ]
    import cupy

    number, repeats = (200, 7) if quick else (1_000, 21)
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

    results = [
        Result(
            "lease",
            "cupy.cuda.Stream() create + destroy",
            median_us_per_op(streams, number, repeats),
            "µs",
            "raw peer of a lease",
        ),
        Result(
            "lease",
            "cupy.cuda.Event() create + destroy",
            median_us_per_op(events, number, repeats),
            "µs",
            "raw peer of an event acquire",
        ),
        Result(
            "lease",
            "with cupy_stream: (CuPy's own switch)",
            median_us_per_op(switches, number * 10, repeats),
            "µs",
            "a prebuilt stream made current and back: the floor under a lease's with",
        ),
    ]
    results.append(_torch_stream(quick))
    return results


def _torch_stream(quick: bool) -> Result:
    name = "torch.cuda.Stream()"
    if importlib.util.find_spec("torch") is None:
        return Result("lease", name, None, "µs", "torch is not installed")
    import torch

    if not torch.cuda.is_available():
        return Result("lease", name, None, "µs", "torch sees no GPU")
    number, repeats = _sizes(quick)
    make = torch.cuda.Stream

    def batch(n: int) -> None:
        for _ in range(n):
            make()  # torch's round-robin pool: no exclusivity, nothing destroyed

    return Result(
        "lease",
        name,
        median_us_per_op(batch, number, repeats),
        "µs",
        f"torch {torch.__version__}: its own pool, no exclusive use",
    )


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
