"""A step of leases as a CUDA graph: what a step costs eager, and replayed.

The step: three compute leases, each ordered after an origin lease, run 100
small kernels each, in 4 rounds of 25; after every round each lease waits for
its neighbour's work so far (the joins between them), and at the end the
origin waits for all three. Eager, the host issues every kernel and every
wait, every step. Captured once with ``pool.capture(origin)``, a step is one
``graph.launch(origin)``.

Host time is the median wall time of issuing one step; the device is
synchronized between steps, outside the timing. Device time is timed by
events on the origin around the step (eager, the device may wait for the
host's launches: that is part of the step's cost). Both runs are taken in
turn, round after round. Goals: a replay at least 10x cheaper on the host
than the eager step, and no slower on the device.

On the host backend the kernels are host functions adding 1 to a small numpy
array, and a replay runs the recorded schedule again, serially, as one task
on the origin (there is no CUDA graph): its figures show what issuing one
task instead of hundreds saves the host, not what a GPU does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np

from .. import CudaStreamPool, EventPool, StreamLease
from .common import Result

__all__ = ["GOALS", "measure"]

LEASES = 3
KERNELS = 100  # per lease and step
ROUNDS = 4  # joins between the leases after each round
ELEMENTS = 256  # each lease's array: kernels too small to fill the device

#: (id of the ratio, numerator row, denominator row, the most it may be).
GOALS = (
    ("goal.replayed_vs_eager_step_host", "graph.replayed_step", "graph.eager_step", 0.1),
    (
        "goal.replayed_vs_eager_step_device",
        "graph.replayed_step_device",
        "graph.eager_step_device",
        1.0,
    ),
)

_Kernel = Callable[[int, StreamLease, int], None]  # (lease index, lease, how many kernels)


def measure(backend: str, quick: bool) -> list[Result]:
    """The eager and the replayed step, host and device time, and the goals' ratios."""
    rounds = 5 if quick else 31
    with CudaStreamPool(LEASES, 1, 0, backend=backend) as pool:
        timing = EventPool(2, 2, timing=True, device=pool.device, backend=backend)
        kernel = _kernel(backend)
        with pool.acquire_comm() as origin:
            _step(pool, origin, kernel)  # loads the kernels: a capture must not
            origin.synchronize()
            with pool.capture(origin) as graph:
                _step(pool, origin, kernel)
            assert graph is not None  # the pool began this capture
            with graph:
                runs = {
                    "graph.eager_step": lambda: _step(pool, origin, kernel),
                    "graph.replayed_step": lambda: graph.launch(origin),
                }
                host_us, device_ms = _measure(runs, origin, timing, rounds)
    note = (
        f"{LEASES} leases x {KERNELS} kernels, {LEASES * ROUNDS} joins; median of {rounds}"
        if backend == "cupy"
        else "host backend: host functions for kernels; a replay runs the recorded "
        "schedule again, serially, as one task (no CUDA graph)"
    )
    extra = {"leases": LEASES, "kernels_per_lease": KERNELS, "rounds": rounds}
    figures = {
        "graph.eager_step": host_us["graph.eager_step"],
        "graph.replayed_step": host_us["graph.replayed_step"],
        "graph.eager_step_device": device_ms["graph.eager_step"],
        "graph.replayed_step_device": device_ms["graph.replayed_step"],
    }
    results = [
        Result("graph", "eager step, host time", figures["graph.eager_step"], "µs", note,
               extra, id="graph.eager_step"),
        Result("graph", "replayed step (graph.launch), host time",
               figures["graph.replayed_step"], "µs", note, extra, id="graph.replayed_step"),
        Result("graph", "eager step, device time", figures["graph.eager_step_device"], "ms",
               note, extra, id="graph.eager_step_device"),
        Result("graph", "replayed step, device time", figures["graph.replayed_step_device"],
               "ms", note, extra, id="graph.replayed_step_device"),
    ]  # fmt: skip
    for goal_id, top, bottom, most in GOALS:
        ratio = figures[top] / figures[bottom]
        verdict = "met" if ratio <= most else "NOT met"
        results.append(
            Result("goal", f"{top} / {bottom}", ratio, "x", f"goal <= {most:g}: {verdict}",
                   {"goal": most}, id=goal_id)
        )  # fmt: skip
    return results


def _step(pool: CudaStreamPool, origin: StreamLease, kernel: _Kernel) -> None:
    """One step, with every wait written out: inside a capture the pool's joins
    repeat the first and last of them, which costs the replay nothing."""
    leases = [pool.acquire_compute() for _ in range(LEASES)]
    try:
        for lease in leases:
            lease.wait(origin)
        for _ in range(ROUNDS):
            for index, lease in enumerate(leases):
                kernel(index, lease, KERNELS // ROUNDS)
            for index, lease in enumerate(leases):
                lease.wait(leases[(index + 1) % LEASES])
        for lease in leases:
            origin.wait(lease)
    finally:
        for lease in leases:
            lease.release()


def _kernel(backend: str) -> _Kernel:
    """Small kernels on a lease: ``x += 1`` on the lease's own array."""
    if backend == "cupy":
        import cupy

        gpu_arrays = [cupy.zeros(ELEMENTS, dtype=cupy.float32) for _ in range(LEASES)]

        def on_gpu(index: int, lease: StreamLease, count: int) -> None:
            array = gpu_arrays[index]
            with lease.cupy_stream:
                for _ in range(count):
                    array += 1

        return on_gpu

    host_arrays = [np.zeros(ELEMENTS, dtype=np.float32) for _ in range(LEASES)]

    def on_host(index: int, lease: StreamLease, count: int) -> None:
        array = host_arrays[index]

        def add_one() -> None:
            np.add(array, 1, out=array)

        for _ in range(count):
            lease.launch_host_func(add_one)

    return on_host


def _measure(
    runs: Mapping[str, Callable[[], object]], origin: StreamLease, timing: EventPool, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median host µs to issue each run, and median device ms of the run, taken in turn."""
    host: dict[str, list[float]] = {name: [] for name in runs}
    device: dict[str, list[float]] = {name: [] for name in runs}
    start, end = timing.acquire(), timing.acquire()
    try:
        for _ in range(rounds):
            for name, run in runs.items():
                start.record(origin)
                began = time.perf_counter()
                run()
                host[name].append((time.perf_counter() - began) * 1e6)
                end.record(origin)
                end.synchronize()
                device[name].append(start.elapsed_time(end))
    finally:
        start.release()
        end.release()
    return (
        {name: statistics.median(values) for name, values in host.items()},
        {name: statistics.median(values) for name, values in device.items()},
    )
