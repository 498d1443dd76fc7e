"""A Pipeline run captured as a graph and replayed: same results, same arrays only."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
from test_pipeline import check_nothing_held, fail_on_call

from cupystreams import CudaStreamPool, PoolClosedError, PoolError
from cupystreams.pipeline import Pipeline, PipelineGraph

ROWS, COLS = 1000, 7
ROW_BYTES = COLS * 4


def fail_capture_on_call(
    monkeypatch: pytest.MonkeyPatch, pipe: Pipeline, stage: str, n: int, error: Exception
) -> None:
    """``fail_on_call``, and ``pipe.capture`` skips its first run (done by the test,
    outside the failure)."""
    fail_on_call(monkeypatch, pipe, stage, n, error)
    monkeypatch.setattr(pipe, "run", lambda data, out=None: out)


def host_arrays(pipe: Pipeline, backend: str) -> tuple[np.ndarray, np.ndarray]:
    data = pipe.empty_host((ROWS, COLS), np.float32)
    data[:] = np.random.default_rng(3).standard_normal((ROWS, COLS)).astype(np.float32)
    return data, pipe.empty_host((ROWS, COLS), np.float32)


@pytest.mark.parametrize("min_copy", [0, 300 * ROW_BYTES], ids=["copy-per-chunk", "copy-groups"])
def test_a_replay_equals_the_serial_run_and_follows_the_data(
    big_pool: CudaStreamPool, min_copy: int
) -> None:
    pipe = Pipeline(
        big_pool,
        lambda x: x * 2 + 1,
        chunk_bytes=64 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=min_copy,
    )
    data, out = host_arrays(pipe, big_pool.backend)
    with pipe.capture(data, out) as graph:
        assert pipe.buffers_kept == 0  # the graph has its own: the first run's are let go
        out[:] = 0
        assert graph.run() is out
        assert np.array_equal(out, pipe.run_serial(data))
        for value in (3.0, -1.5):
            data[:] = value  # in place: the graph reads the same address again
            out[:] = 0
            graph.run(data, out)
            assert np.all(out == value * 2 + 1)
    check_nothing_held(big_pool, pipe)


def test_a_capture_spreads_a_groups_chunks_over_idle_compute_leases(
    big_pool: CudaStreamPool,
) -> None:
    pipe = Pipeline(big_pool, lambda x: x * 2, chunk_bytes=64 * ROW_BYTES, min_copy_bytes=1)
    data, out = host_arrays(pipe, big_pool.backend)
    pipe.run(data, out)  # the capture's first run, by hand: it uses one compute lease

    def compute_acquisitions() -> list[int]:
        return [s.acquisitions for s in big_pool.stream_stats() if s.kind == "compute"]

    before = compute_acquisitions()
    one_copy = Pipeline(big_pool, lambda x: x * 2, chunk_bytes=64 * ROW_BYTES)  # one group
    with PipelineGraph._capture(one_copy, data, out) as graph:
        taken = [b - a for a, b in zip(before, compute_acquisitions(), strict=True)]
        assert sorted(taken) == [1, 1, 1, 1], "every idle compute stream joined the capture"
        out[:] = 0
        graph.run()
        assert np.array_equal(out, data * 2)
    # A copy per chunk: a group of one chunk needs one compute lease.
    before = compute_acquisitions()
    with PipelineGraph._capture(pipe, data, out):
        taken = [b - a for a, b in zip(before, compute_acquisitions(), strict=True)]
        assert sum(taken) == 1


@pytest.mark.parametrize(
    "error", [MemoryError("out of device memory"), PoolClosedError("the pool was closed")]
)
def test_a_capture_whose_buffers_cannot_be_allocated_holds_nothing(
    big_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    pipe = Pipeline(
        big_pool, lambda x: x * 2, chunk_bytes=64 * ROW_BYTES, min_copy_bytes=300 * ROW_BYTES
    )
    data, out = host_arrays(pipe, big_pool.backend)
    pipe.run(data, out)
    # The second allocation, before the capture: the first slot's gathered results.
    fail_capture_on_call(monkeypatch, pipe, "device_empty", 2, error)
    with pytest.raises(type(error), match=str(error)):  # its own error, not a ValueError on fn
        pipe.capture(data, out)
    monkeypatch.undo()
    check_nothing_held(big_pool, pipe)


def test_a_replay_refuses_other_arrays(big_pool: CudaStreamPool) -> None:
    pipe = Pipeline(big_pool, lambda x: x + 1, chunk_bytes=64 * ROW_BYTES)
    data, out = host_arrays(pipe, big_pool.backend)
    graph = pipe.capture(data, out)
    other = pipe.empty_host((ROWS, COLS), np.float32)
    with pytest.raises(ValueError, match="data is not the array this graph was captured for"):
        graph.run(other)
    with pytest.raises(ValueError, match="data is not the array"):
        graph.run(data[: ROWS // 2])  # another shape
    with pytest.raises(ValueError, match="out is not the array"):
        graph.run(data, other)
    graph.close()
    graph.close()  # idempotent
    assert graph.closed
    with pytest.raises(PoolError, match="closed"):
        graph.run()


def test_a_replay_of_a_pageable_array_locks_it_in_place(big_pool: CudaStreamPool) -> None:
    pipe = Pipeline(big_pool, lambda x: x * 3, chunk_bytes=128 * ROW_BYTES)
    data = np.full((ROWS, COLS), 2.0, np.float32)  # ordinary numpy memory
    out = np.zeros_like(data)
    with pipe.capture(data, out) as graph:
        out[:] = 0
        graph.run()
        assert np.all(out == 6.0)


@pytest.mark.gpu
def test_an_fn_that_waits_on_the_host_cannot_be_captured() -> None:
    import cupy

    def syncs(x: Any) -> Any:
        y = x * 2
        cupy.cuda.get_current_stream().synchronize()  # refused inside a capture
        return y

    with CudaStreamPool(backend="cupy") as pool:
        pipe = Pipeline(pool, syncs, chunk_bytes=64 * ROW_BYTES)
        data, out = host_arrays(pipe, "cupy")
        with pytest.raises(ValueError, match="cannot be captured as a CUDA graph"):
            pipe.capture(data, out)
        # The pool is usable afterwards, and nothing was left capturing.
        assert np.array_equal(pipe.run(data, out), data * 2)
        assert pool.stats().leased == 0


def test_a_capture_that_fails_leaves_no_lease_and_no_capture(
    big_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = Pipeline(big_pool, lambda x: x + 1, chunk_bytes=64 * ROW_BYTES, min_copy_bytes=0)
    data, out = host_arrays(pipe, big_pool.backend)
    pipe.run(data, out)  # the first run, outside the failure
    fail_capture_on_call(
        monkeypatch, pipe, "copy_in", 3, RuntimeError("a copy that cannot be captured")
    )
    with pytest.raises(ValueError, match="cannot be captured as a CUDA graph"):
        pipe.capture(data, out)
    monkeypatch.undo()
    check_nothing_held(big_pool, pipe)
    assert np.array_equal(pipe.run(data, out), data + 1)  # nothing left capturing


def test_a_host_replay_raises_what_fn_raised_and_the_next_replay_runs_again() -> None:
    """On the host backend a replay calls fn again: its failure is the replay's
    (not a silent skip of the stages after it), and a later replay starts clean."""
    failing = [False]

    def fn(x: np.ndarray) -> np.ndarray:
        if failing[0]:
            raise RuntimeError("fn failed during the replay")
        return x * 2

    with CudaStreamPool(2, 2, 0, backend="host") as pool:
        pipe = Pipeline(pool, fn, chunk_bytes=64 * ROW_BYTES)
        data, out = host_arrays(pipe, "host")
        with pipe.capture(data, out) as graph:
            failing[0] = True
            with pytest.raises(RuntimeError, match="fn failed during the replay"):
                graph.run()
            failing[0] = False
            data[:] = 5.0
            out[:] = 0
            graph.run()
            assert np.all(out == 10.0)
        check_nothing_held(pool, pipe)


@pytest.mark.gpu
def test_a_graphs_pageable_arrays_stay_locked_while_it_lives() -> None:
    """A graph copies from and into fixed addresses at every replay: the page
    locks' bounds must never unlock its arrays under it; arrays that find no
    room meanwhile are staged, and the graph's go once it is closed."""
    import cupy

    from cupystreams._page_lock import cupy_page_locks

    locks = cupy_page_locks(cupy.cuda.runtime.getDevice())
    locks.clear()
    bound = locks.max_arrays
    locks.max_arrays = 2
    try:
        with CudaStreamPool(4, 2, 0, backend="cupy") as pool:
            pipe = Pipeline(pool, lambda x: x * 2 + 1, chunk_bytes=64 * ROW_BYTES)
            data = np.random.default_rng(5).random((ROWS, COLS), dtype=np.float32)  # pageable
            out = np.zeros_like(data)
            pipe.run(data, out)  # the first sighting: staged
            graph = pipe.capture(data, out)  # its run locks both
            graph_ranges = sorted(locks.locked())
            assert len(graph_ranges) == 2 and sorted(locks.in_use()) == graph_ranges
            other = Pipeline(pool, lambda x: x - 1, chunk_bytes=64 * ROW_BYTES)
            more = np.full((ROWS, COLS), 4.0, np.float32)
            more_out = np.zeros_like(more)
            for _ in range(3):  # would lock these, evicting the graph's, if they were not held
                other.run(more, more_out)
                assert np.all(more_out == 3.0)
            assert sorted(locks.locked()) == graph_ranges
            data[:] = 1.0
            graph.run()
            assert np.all(out == 3.0)
            graph.close()
            assert locks.in_use() == []  # the runs' holds went with them, the graph's now
            other.run(more, more_out)  # room now: the graph's arrays go, these are locked
            assert sorted(n for _, n in locks.locked()) == [more.nbytes, more_out.nbytes]
            assert np.all(more_out == 3.0)
            dropped = other.capture(more, more_out)  # holds more and more_out
            assert len(locks.in_use()) == 2
            del dropped  # never closed: its holds go when it is collected
            gc.collect()
            assert locks.in_use() == []
    finally:
        locks.max_arrays = bound
        locks.clear()
