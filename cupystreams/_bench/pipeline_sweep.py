"""The pipeline at every chunk size, and on pageable arrays, against the stage bound.

For each chunk size the stage bound is measured with the same chunks (copy
in alone, copy out alone, both at once, compute alone: the slowest), then
``Pipeline.run`` and a three-stream loop written by hand with CuPy, all in
interleaved rounds, and the run captured as a graph and replayed
(``Pipeline.capture``). The figures are efficiencies, ``bound / time``: the share
of the machine a schedule uses. Pageable arrays (1 GiB each way in 64 MiB
chunks) are compared with the bound of page-locked memory for the same
chunks: a first run (an array never seen: staged) and a run again (the array
is page-locked in place by then).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import CudaStreamPool
from .._pipeline_engines import host_copy
from ..pipeline import Pipeline
from .common import Result, interleaved_medians, median_ms
from .pipeline_bench import _raw_cupy_three_streams, _stage_runs

__all__ = ["CHUNK_SIZES", "measure_sweep"]

#: (bytes per chunk, the label in result ids), smallest first.
CHUNK_SIZES = (
    (64 << 10, "64KiB"),
    (256 << 10, "256KiB"),
    (1 << 20, "1MiB"),
    (8 << 20, "8MiB"),
    (64 << 20, "64MiB"),
)
_DEPTH = 4  # chunks in flight, for the pool and the loop by hand alike


def _fn(x: Any) -> Any:
    return x * 2 + 1


def measure_sweep(backend: str, quick: bool) -> list[Result]:
    """One result per chunk size (``pipeline.chunk_<size>``) and the pageable rows."""
    ids = [f"pipeline.chunk_{label}" for _, label in CHUNK_SIZES]
    ids += [
        "pipeline.pageable_first",
        "pipeline.pageable_again",
        "pipeline.pageable_batched_copies",
    ]
    if backend != "cupy":
        return [Result("sweep", i, None, "x bound", "needs a GPU", id=i) for i in ids]
    total = (64 if quick else 256) << 20
    repeats = 3 if quick else 7
    with CudaStreamPool(backend="cupy") as pool:
        results = _sweep(pool, total, repeats)
        results += _pageable(pool, (256 if quick else 1024) << 20, repeats)
    return results


def _sweep(pool: CudaStreamPool, total: int, repeats: int) -> list[Result]:
    results = []
    for chunk_bytes, label in CHUNK_SIZES:
        pipe = Pipeline(pool, _fn, chunk_bytes=chunk_bytes, max_in_flight=_DEPTH)
        rows = total // 4
        data = pipe.empty_host((rows,), np.float32)
        data[:] = np.linspace(-1.0, 1.0, rows, dtype=np.float32)
        out = pipe.empty_host((rows,), np.float32)
        out[:] = 0
        chunks = total // chunk_bytes
        runs, state = _stage_runs(pool, pipe, data, out, chunks)
        stages = ("h2d", "d2h", "both", "compute")
        runs["pool"] = functools.partial(pipe.run, data, out)
        # The same run with a copy per chunk, as the loop by hand copies.
        per_chunk = Pipeline(
            pool, _fn, chunk_bytes=chunk_bytes, max_in_flight=_DEPTH, min_copy_bytes=0
        )
        runs["per_chunk"] = functools.partial(per_chunk.run, data, out)
        runs["hand"] = _raw_cupy_three_streams(_fn, data, out, chunk_bytes // 4, _DEPTH)
        with pipe.capture(data, out) as graph:
            runs["replay"] = graph.run
            ms = interleaved_medians(runs, repeats)
            out[:] = 0
            graph.run()
            replay_right = bool(np.array_equal(out, _fn(data)))
        state.check()
        bound = max(ms[stage] for stage in stages)
        pool_eff, hand_eff = bound / ms["pool"], bound / ms["hand"]
        per_chunk_eff = bound / ms["per_chunk"]
        replay_eff = bound / ms["replay"]
        per_chunk_us = ms["pool"] * 1e3 / chunks
        results.append(
            Result(
                "sweep",
                f"{label} chunks: Pipeline.run / bound",
                pool_eff,
                "x bound",
                f"hand-written 3-stream loop {hand_eff:.2f}, graph replay {replay_eff:.2f}, "
                f"a copy per chunk {per_chunk_eff:.2f}; "
                f"{chunks} chunks, {per_chunk_us:.1f} µs per chunk, bound {bound:.2f} ms",
                {
                    "chunk_bytes": chunk_bytes,
                    "chunks": chunks,
                    "bound_ms": bound,
                    "pool_ms": ms["pool"],
                    "hand_ms": ms["hand"],
                    "per_chunk_ms": ms["per_chunk"],
                    "per_chunk_efficiency": per_chunk_eff,
                    "replay_ms": ms["replay"],
                    "pool_efficiency": pool_eff,
                    "hand_efficiency": hand_eff,
                    "replay_efficiency": replay_eff,
                    "replay_right": replay_right,
                    "stages_ms": {stage: ms[stage] for stage in stages},
                },
                id=f"pipeline.chunk_{label}",
            )
        )
    return results


def _pageable(pool: CudaStreamPool, total: int, repeats: int) -> list[Result]:
    """Pageable arrays in 64 MiB chunks: never seen before, and seen before (page-locked)."""
    chunk = 64 << 20
    pipe = Pipeline(pool, _fn, chunk_bytes=chunk, max_in_flight=_DEPTH)
    source = np.linspace(-1.0, 1.0, total // 4, dtype=np.float32)
    pinned_in = pipe.empty_host(source.shape, np.float32)
    pinned_in[:] = source
    pinned_out = pipe.empty_host(source.shape, np.float32)
    pinned_out[:] = 0
    runs, state = _stage_runs(pool, pipe, pinned_in, pinned_out, total // chunk)
    data, out = source.copy(), np.zeros_like(source)
    pipe.run(data, out)  # the first sighting: staged
    locking_ms = _ms(functools.partial(pipe.run, data, out))  # the second: locks both
    # Runs again (straight from the locked arrays) in the same rounds as the
    # bound's stages, so that a drift of the machine moves both alike.
    runs["again"] = functools.partial(pipe.run, data, out)
    ms = interleaved_medians(runs, repeats)
    again_ms = ms.pop("again")
    bound = max(ms.values())
    state.check()
    # What staging costs the host whatever the schedule: a first run copies
    # the input into page-locked buffers and the results out of them, into an
    # array whose pages are new (as the first run's are), at memory speed.
    staging_ms = statistics.median(
        _ms(functools.partial(host_copy, pinned_in, source))
        + _ms(functools.partial(host_copy, np.zeros_like(source), pinned_out))
        for _ in range(repeats)
    )
    del pinned_in, pinned_out

    def first() -> float:
        fresh, fresh_out = source.copy(), np.zeros_like(source)  # never seen: a first sighting
        return _ms(functools.partial(pipe.run, fresh, fresh_out))

    first_ms = statistics.median(first() for _ in range(repeats))
    right = bool(np.array_equal(out, _fn(source)))
    batched_ms = _batched_pageable_copies_ms(source, chunk, repeats)
    note = f"64 MiB chunks, {total >> 20} MiB each way; of the page-locked bound {bound:.2f} ms"
    return [
        Result(
            "sweep",
            "pageable arrays, first run / bound",
            bound / first_ms,
            "x bound",
            note + f"; staged through page-locked buffers; the staging memcpys alone take "
            f"{staging_ms:.1f} ms, and the run {first_ms / staging_ms:.2f} times that",
            {"ms": first_ms, "bound_ms": bound, "staging_floor_ms": staging_ms},
            id="pipeline.pageable_first",
        ),
        Result(
            "sweep",
            "pageable arrays, run again / bound",
            bound / again_ms,
            "x bound",
            note + f"; page-locked in place (locking them took {locking_ms:.1f} ms, once); "
            f"results right: {right}",
            {"ms": again_ms, "bound_ms": bound, "locking_run_ms": locking_ms, "right": right},
            id="pipeline.pageable_again",
        ),
        Result(
            "sweep",
            "pageable arrays, batched copies alone / bound",
            None if batched_ms is None else bound / batched_ms,
            "x bound",
            note + "; cuMemcpyBatchAsync straight from and into the pageable arrays, both "
            "directions at once, no compute: the most a pipeline on them could reach"
            if batched_ms is not None
            else "needs cuda-bindings 12.8+ (cuMemcpyBatchAsync)",
            {"ms": batched_ms, "bound_ms": bound},
            id="pipeline.pageable_batched_copies",
        ),
    ]


def _ms(run: Callable[[], object]) -> float:
    """The wall time of one call of ``run``, in ms, with no warm-up: a first run is the figure."""
    return median_ms(run, 1, warmup=0)


def _batched_pageable_copies_ms(source: np.ndarray, chunk: int, repeats: int) -> float | None:
    """Both directions of ``source`` (pageable) as two batches of ``chunk``-byte copies.

    ``cuMemcpyBatchAsync`` (CUDA 12.8+) takes pageable memory when the source
    may be read out of stream order; it is measured here so the pipeline can
    keep whichever is faster. None where cuda-bindings lacks it.
    """
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    if not hasattr(driver, "cuMemcpyBatchAsync"):
        return None
    import cupy

    back = np.zeros_like(source)
    device_in, device_out = cupy.empty_like(source), cupy.asarray(source)
    attributes = driver.CUmemcpyAttributes()
    attributes.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_ANY
    h2d, d2h = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    count = source.nbytes // chunk

    def batch(dst: int, src: int, stream: Any) -> None:
        dsts = [driver.CUdeviceptr(dst + i * chunk) for i in range(count)]
        srcs = [driver.CUdeviceptr(src + i * chunk) for i in range(count)]
        (error, *_) = driver.cuMemcpyBatchAsync(
            dsts, srcs, [chunk] * count, count, [attributes], [0], 1, stream.ptr
        )
        if error != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuMemcpyBatchAsync failed: {error}")

    def both() -> None:
        batch(device_in.data.ptr, source.ctypes.data, h2d)
        batch(back.ctypes.data, device_out.data.ptr, d2h)
        h2d.synchronize()
        d2h.synchronize()

    try:
        ms = interleaved_medians({"batched": both}, repeats)["batched"]
    except RuntimeError:
        return None  # a driver older than the bindings
    return ms if np.array_equal(back, source) else None
