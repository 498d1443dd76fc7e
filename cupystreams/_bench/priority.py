"""How long one short request takes inside a flood of normal-priority work.

Three compute leases are flooded with big kernels (many waves of blocks that
fill every SM); then one tiny kernel is launched on a fourth, idle lease at
normal priority, or on the pool's high-priority lease. At equal priority the
block scheduler hands out the flood's queued blocks first; at high priority
the request's block goes to the next SM that frees up. Its latency is timed on the device, from
an event recorded just before it to one recorded just after it.

On the host backend the same scene (``_one``, on the same leases of a pool)
queues its kernels and events on a device model instead: the flood's blocks
take modelled SMs, so the request waits for a block at high priority and for
the flood's earlier kernels at normal priority, as on a GPU. Those figures are
modelled from an H100's, not measured.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .. import CudaStreamPool, EventPool, StreamLease
from .._trace import Trace
from .common import Result
from .model import H100, DeviceModel, DeviceParams, Op
from .timeline import Bar, Panel, lane_labels
from .workloads import cycles_per_us, gpu_spin_kernel

__all__ = ["PriorityFigures", "measure_priority", "priority_results"]

FLOOD_STREAMS = 3
FLOOD_KERNELS = 6  # per flooded lease
WAVES = 16
BLOCK_US = 100  # how long each block of the flood holds its SM
SETTLE_S = 0.002  # the flood's head start before the request


@dataclass(frozen=True)
class PriorityFigures:
    """Median request latencies in ms."""

    backend: str
    normal_ms: float
    high_ms: float
    flood_ms: float  # how long the device stays saturated by one flood
    repeats: int
    trace: Trace | None = None  # the GPU's last rounds, traced
    model: str | None = None  # the GPU the times are modelled on; None: measured
    panels: tuple[Panel, ...] = ()  # the modelled rounds, as drawn


class _Event(Protocol):
    """A timing event: a ``PooledEvent``, or a mark on the device model."""

    def record(self, stream: Any) -> None: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end_event: Any) -> float: ...

    def release(self) -> None: ...


class _Work(Protocol):
    """What one round queues and how it waits, on a GPU or on the model."""

    def event(self) -> _Event: ...

    def flood(self, lease: StreamLease) -> None: ...

    def settle(self) -> None: ...

    def request(self, lease: StreamLease) -> None: ...

    def synchronize(self, lease: StreamLease) -> None: ...


class _GpuWork:
    """Flood and request kernels on the GPU, timed by device events."""

    def __init__(self, block_us: float, flood_kernels: int, timing: EventPool) -> None:
        import cupy

        device = cupy.cuda.runtime.getDevice()
        self._sms = int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])
        self._cycles = int(block_us * cycles_per_us(device))
        self._kernel = gpu_spin_kernel()
        self._flood_kernels = flood_kernels
        self._timing = timing

    def event(self) -> _Event:
        return self._timing.acquire()

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

    def settle(self) -> None:
        time.sleep(SETTLE_S)

    def synchronize(self, lease: StreamLease) -> None:
        lease.synchronize()


class _ModelEvent:
    """A timing event on the device model: a mark on the lease's modelled stream."""

    def __init__(self, model: DeviceModel) -> None:
        self._model = model
        self.mark: Op | None = None

    def record(self, stream: StreamLease) -> None:
        self.mark = self._model.mark(stream.stream.stream_id)

    def synchronize(self) -> None:
        assert self.mark is not None, "synchronize() before record()"
        self._model.wait(self.mark)

    def elapsed_time(self, end_event: Any) -> float:
        assert isinstance(end_event, _ModelEvent)
        start, end = self.mark, end_event.mark
        assert start is not None and end is not None
        assert start.end_ms is not None and end.end_ms is not None, "elapsed_time() before both ran"
        return end.end_ms - start.end_ms

    def release(self) -> None:
        pass  # nothing to give back: a mark is not a device resource


class _ModelWork:
    """The GPU's flood and request, in the same shape, on a fresh device model.

    A flood kernel is one block per SM for each of ``WAVES`` waves (on the GPU
    each SM holds 8 blocks of a wave at once; they start and end together, so
    the model counts them as one), so a high-priority request waits for the
    next block to end, not for the kernel.
    """

    def __init__(self, params: DeviceParams = H100) -> None:
        self.model = DeviceModel(params)
        self._sms = params.sms
        self.requested: Op | None = None

    def event(self) -> _Event:
        return _ModelEvent(self.model)

    def flood(self, lease: StreamLease) -> None:
        stream = lease.stream
        for _ in range(FLOOD_KERNELS):
            self.model.kernel(
                stream.stream_id, self._sms * WAVES, BLOCK_US / 1e3, "flood", stream.priority
            )

    def request(self, lease: StreamLease) -> None:
        stream = lease.stream
        self.requested = self.model.kernel(
            stream.stream_id, 1, BLOCK_US / 20 / 1e3, "urgent", stream.priority
        )

    def settle(self) -> None:
        self.model.sleep(SETTLE_S * 1e3)

    def synchronize(self, lease: StreamLease) -> None:
        self.model.wait_stream(lease.stream.stream_id)

    def panel(self, title: str, latency_ms: float, labels: dict[int, str]) -> Panel:
        """The round as drawn: the flood's kernels, and the request from queued to done."""
        request = self.requested
        assert request is not None and request.start_ms is not None and request.end_ms is not None
        intervals = [i for i in self.model.intervals() if i.stage == "flood"]
        bars = [Bar(labels[i.stream], i.stage, i.start_ms, i.end_ms) for i in intervals]
        lane = labels[request.stream]
        # The latency runs from the event before the request to the one after
        # it: the request waits from the first, and the second follows its end.
        bars += [
            Bar(lane, "urgent, queued", request.end_ms - latency_ms, request.start_ms),
            Bar(lane, "urgent", request.start_ms, request.end_ms, f"{latency_ms:.2f} ms"),
        ]
        lanes = sorted({i.stream for i in intervals} | {request.stream})
        return Panel(title, tuple(labels[s] for s in lanes), tuple(bars))


def _one(
    pool: CudaStreamPool, work: _Work, acquire_request: Callable[[], StreamLease]
) -> tuple[float, float]:
    """(request latency, flood duration) in ms for one flood."""
    floods = [pool.acquire_compute() for _ in range(FLOOD_STREAMS)]
    try:
        flood_start, flood_end = work.event(), work.event()
        before, after = work.event(), work.event()
        flood_start.record(floods[0])
        for lease in floods:
            work.flood(lease)
        work.settle()  # let the flood occupy every SM first
        with acquire_request() as request:
            before.record(request)
            work.request(request)
            after.record(request)
        after.synchronize()
        for lease in floods:
            work.synchronize(lease)
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
    On the host backend the figures are modelled (``_model_priority``): one
    round each, always drawn (``figures.panels``).
    """
    if backend == "host":
        return _model_priority()
    pool = CudaStreamPool(compute_streams=FLOOD_STREAMS + 1, backend=backend)
    timing = EventPool(initial_size=4, timing=True, backend=pool._backend)
    work = _GpuWork(block_us=BLOCK_US, flood_kernels=FLOOD_KERNELS, timing=timing)
    try:
        normal, high, floods = [], [], []
        recorded: Trace | None = None
        for index in range(repeats):
            tracing = trace and index == repeats - 1
            with pool.trace() if tracing else contextlib.nullcontext() as recording:
                latency, flood = _one(pool, work, pool.acquire_compute)
                normal.append(latency)
                floods.append(flood)
                latency, flood = _one(pool, work, pool.acquire_high_priority)
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


def _model_priority() -> PriorityFigures:
    """One round at normal and one at high priority, on the leases of a host pool."""
    with CudaStreamPool(compute_streams=FLOOD_STREAMS + 1, backend="host") as pool:
        labels = lane_labels(pool._streams)
        normal_work, high_work = _ModelWork(), _ModelWork()
        normal, flood = _one(pool, normal_work, pool.acquire_compute)
        high, _ = _one(pool, high_work, pool.acquire_high_priority)
    panels = (
        normal_work.panel(f"urgent request at normal priority: {normal:.2f} ms", normal, labels),
        high_work.panel(f"urgent request on the high-priority lease: {high:.2f} ms", high, labels),
    )
    return PriorityFigures("host", normal, high, flood, 1, model=H100.name, panels=panels)


def priority_results(figures: PriorityFigures) -> list[Result]:
    where = f"{figures.backend} backend, median of {figures.repeats}"
    if figures.model is not None:
        where = f"{figures.backend} backend, modelled on an {figures.model} (not measured)"
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
