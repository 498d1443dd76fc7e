"""Device memory CuPy keeps cached: a fresh stream per task vs pooled streams.

CuPy's memory pool keeps one arena per stream and never gives a stream's
cached blocks to another stream, so work spread over many short-lived streams
strands memory in arenas nobody will use again. A pool reuses a few streams,
so the same work keeps a few arenas.

Without a GPU (``model_memory``) the same tasks run on the same kind of
streams, fresh ones or the leases of a host pool, against a model of those
arenas; the figures are then modelled, not measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .. import CudaStreamPool
from .common import Result

__all__ = ["MemoryFigures", "measure_memory", "memory_results", "model_memory"]


@dataclass(frozen=True)
class MemoryFigures:
    """MiB held by CuPy's memory pool after the same allocations."""

    tasks: int
    task_mib: int
    fresh_mib: float
    pooled_mib: float
    pooled_streams: int
    modelled: bool = False


def measure_memory(tasks: int = 64, task_mib: int = 4, streams: int = 4) -> MemoryFigures:
    """Allocate, use and free ``task_mib`` per task: on fresh streams, then on a pool.

    Both figures are what CuPy's pool holds once every task has finished.
    """
    import cupy

    mempool = cupy.get_default_memory_pool()
    count = (task_mib << 20) // 4

    def task() -> None:
        block = cupy.empty(count, cupy.float32)
        block.fill(1.0)  # used on the current stream, then freed into its arena

    cupy.cuda.Device().synchronize()
    mempool.free_all_blocks()
    baseline = mempool.total_bytes()
    # Each task on its own new stream, the streams alive together as those of
    # concurrent tasks are. (A destroyed stream's arena stays cached too, but
    # whether a later stream reuses it depends on the driver recycling the
    # handle, which would make the figure a matter of luck.)
    streams_of_tasks = []
    for _ in range(tasks):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            task()
        streams_of_tasks.append(stream)
    cupy.cuda.Device().synchronize()
    fresh = mempool.total_bytes() - baseline
    del streams_of_tasks
    mempool.free_all_blocks()

    baseline = mempool.total_bytes()
    with CudaStreamPool(compute_streams=streams, comm_streams=0, high_priority_streams=0) as pool:
        # One lease per stream at a time, as concurrent tasks would hold them.
        for start in range(0, tasks, streams):
            leases = [pool.acquire_compute() for _ in range(min(streams, tasks - start))]
            for lease in leases:
                with lease:
                    task()
        pool.sync_all()
        pooled = mempool.total_bytes() - baseline
    mempool.free_all_blocks()
    return MemoryFigures(tasks, task_mib, fresh / 2**20, pooled / 2**20, streams)


class _Arenas:
    """CuPy's memory pool as the figures see it: freed blocks stay cached per stream.

    A block freed on a stream is reused only by a later allocation on that
    stream (of at most its size); every other allocation is a new block. The
    pool holds every block it ever allocated until ``free_all_blocks``.
    """

    def __init__(self) -> None:
        self._cached: dict[int, list[int]] = {}  # stream -> sizes of its free blocks
        self.held = 0

    def task(self, stream: int, size: int) -> None:
        """Allocate ``size`` bytes on ``stream``, use them, free them."""
        cached = self._cached.setdefault(stream, [])
        if not any(block >= size for block in cached):
            self.held += size  # a new block, cached on this stream once freed
            cached.append(size)


def model_memory(tasks: int = 64, task_mib: int = 4, streams: int = 4) -> MemoryFigures:
    """``measure_memory``'s tasks against a model of CuPy's per-stream arenas.

    The fresh streams are new stream numbers, alive together; the pooled ones
    are the leases of a host pool of ``streams`` streams, taken as
    ``measure_memory`` takes them.
    """
    size = task_mib << 20
    fresh = _Arenas()
    new_streams = itertools.count(1 << 20)  # numbers no pool stream has
    for _ in range(tasks):
        fresh.task(next(new_streams), size)
    pooled = _Arenas()
    with CudaStreamPool(
        compute_streams=streams, comm_streams=0, high_priority_streams=0, backend="host"
    ) as pool:
        for start in range(0, tasks, streams):
            leases = [pool.acquire_compute() for _ in range(min(streams, tasks - start))]
            for lease in leases:
                with lease:
                    pooled.task(lease.stream.stream_id, size)
    return MemoryFigures(
        tasks, task_mib, fresh.held / 2**20, pooled.held / 2**20, streams, modelled=True
    )


def memory_results(figures: MemoryFigures | None, reason: str = "") -> list[Result]:
    if figures is None:
        return [Result("memory", "CuPy pool held after 64 x 4 MiB tasks", None, "MiB", reason)]
    f = figures
    what = f"after {f.tasks} tasks of {f.task_mib} MiB"
    how = "modelled CuPy arenas (not measured)" if f.modelled else "CuPy alone"
    return [
        Result(
            "memory",
            f"held {what}, fresh stream per task",
            f.fresh_mib,
            "MiB",
            f"{how}, one cached block per stream",
        ),
        Result(
            "memory",
            f"held {what}, {f.pooled_streams} pooled streams",
            f.pooled_mib,
            "MiB",
            f"{f.fresh_mib / max(f.pooled_mib, 1e-9):.0f}x less"
            + (", modelled" if f.modelled else ""),
        ),
    ]
