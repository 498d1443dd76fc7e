"""How long one short request takes inside a flood of normal-priority work.

Three compute leases are flooded with big kernels (many waves of blocks that
fill every SM); then one tiny kernel is launched on a fourth, idle lease at
normal priority, or on the pool's high-priority lease. At equal priority the
block scheduler hands out the flood's queued blocks first; at high priority
the request's block goes to the next SM that frees up. Its latency is timed on the device, from
an event recorded just before it to one recorded just after it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import CudaStreamPool, EventPool, StreamLease
from .._trace import Trace
from .common import Result
from .simulated import SimDevice
from .workloads import cycles_per_us, gpu_spin_kernel

__all__ = ["PriorityFigures", "measure_priority", "priority_results"]

FLOOD_STREAMS = 3
WAVES = 16


@dataclass(frozen=True)
class PriorityFigures:
    """Median request latencies in ms."""

    backend: str
    normal_ms: float
    high_ms: float
    flood_ms: float  # how long the device stays saturated by one flood
    repeats: int
    trace: Trace | None = None


class _GpuWork:
    """Flood and request kernels on the GPU."""

    def __init__(self, block_us: float, flood_kernels: int) -> None:
        import cupy

        device = cupy.cuda.runtime.getDevice()
        self._sms = int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])
        self._cycles = int(block_us * cycles_per_us(device))
        self._kernel = gpu_spin_kernel()
        self._flood_kernels = flood_kernels

    def flood(self, lease: StreamLease) -> None:
        cycles = np.int64(self._cycles)
        with lease.cupy_stream:  # current for the launches; the lease stays held
            for _ in range(self._flood_kernels):
                # 8 blocks of 256 threads fill an SM; WAVES times that many
                # blocks keep every SM busy for WAVES block times, as a big
                # kernel does.
                self._kernel((self._sms * 8 * WAVES,), (256,), (cycles, None))

    def request(self, lease: StreamLease) -> None:
        with lease.cupy_stream:
            self._kernel((1,), (32,), (np.int64(self._cycles // 20), None))

    def close(self) -> None:
        pass


class _HostWork:
    """The same shape of work on a ``SimDevice``."""

    def __init__(self, block_ms: float, flood_kernels: int) -> None:
        self._device = SimDevice(sms=4)
        self._block_s = block_ms / 1e3
        self._flood_kernels = flood_kernels

    def flood(self, lease: StreamLease) -> None:
        priority = lease.stream.priority
        for _ in range(self._flood_kernels):
            lease.launch_host_func(lambda: self._device.run_kernel(priority, 8, self._block_s))

    def request(self, lease: StreamLease) -> None:
        priority = lease.stream.priority
        block_s = self._block_s / 20
        lease.launch_host_func(lambda: self._device.run_kernel(priority, 1, block_s))

    def close(self) -> None:
        self._device.close()


def _one(
    pool: CudaStreamPool,
    timing: EventPool,
    work: Any,
    acquire_request: Callable[[], StreamLease],
) -> tuple[float, float]:
    """(request latency, flood duration) in ms for one flood."""
    floods = [pool.acquire_compute() for _ in range(FLOOD_STREAMS)]
    try:
        flood_start, flood_end = timing.acquire(), timing.acquire()
        before, after = timing.acquire(), timing.acquire()
        flood_start.record(floods[0])
        for lease in floods:
            work.flood(lease)
        time.sleep(0.002)  # let the flood occupy every SM first
        with acquire_request() as request:
            before.record(request)
            work.request(request)
            after.record(request)
        after.synchronize()
        for lease in floods:
            lease.synchronize()
        flood_end.record(floods[0])
        flood_end.synchronize()
        figures = before.elapsed_time(after), flood_start.elapsed_time(flood_end)
        for event in (flood_start, flood_end, before, after):
            event.release()
        return figures
    finally:
        for lease in floods:
            lease.release()


def measure_priority(backend: str, repeats: int, trace: bool = False) -> PriorityFigures:
    """Median latency of a request at normal and at high priority inside a flood.

    With ``trace``, the last normal and high rounds are traced (``figures.trace``).
    """
    work: Any = (
        _GpuWork(block_us=100, flood_kernels=6)
        if backend == "cupy"
        else _HostWork(block_ms=4, flood_kernels=6)
    )
    pool = CudaStreamPool(compute_streams=FLOOD_STREAMS + 1, backend=backend)
    timing = EventPool(initial_size=4, timing=True, backend=pool._backend)
    try:
        normal, high, floods = [], [], []
        recorded: Trace | None = None
        for index in range(repeats):
            tracing = trace and index == repeats - 1
            with pool.trace() if tracing else contextlib.nullcontext() as recording:
                latency, flood = _one(pool, timing, work, pool.acquire_compute)
                normal.append(latency)
                floods.append(flood)
                latency, flood = _one(pool, timing, work, pool.acquire_high_priority)
                high.append(latency)
            recorded = recording or recorded
        return PriorityFigures(
            backend,
            statistics.median(normal),
            statistics.median(high),
            statistics.median(floods),
            repeats,
            recorded,
        )
    finally:
        timing._close("the measurement ended")
        pool.close()
        work.close()


def priority_results(figures: PriorityFigures) -> list[Result]:
    where = f"{figures.backend} backend, median of {figures.repeats}"
    return [
        Result(
            "priority",
            "request in a flood, normal priority",
            figures.normal_ms,
            "ms",
            f"{where}; the flood lasts {figures.flood_ms:.1f} ms",
        ),
        Result(
            "priority",
            "request in a flood, high-priority lease",
            figures.high_ms,
            "ms",
            f"{where}; {figures.normal_ms / figures.high_ms:.1f}x sooner",
        ),
    ]
