"""cupystreams.pipeline: results, ordering, bounded buffers, failures, bad input.

Every behaviour runs on the host backend (simulated streams, numpy) and, with
a GPU, on the cupy backend with real copies and kernels.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupystreams import CudaStreamPool
from cupystreams.pipeline import DEFAULT_MIN_COPY_BYTES, Pipeline

ROWS, COLS = 1000, 7
ROW_BYTES = COLS * 4


def double_plus_one(x: Any) -> Any:
    return x * 2 + 1  # numpy on the host backend, CuPy on the GPU


@pytest.fixture(params=[0, 300 * ROW_BYTES], ids=["copy-per-chunk", "copy-groups"])
def min_copy(request: pytest.FixtureRequest) -> int:
    """A copy per chunk, or chunks copied in groups of about 300 rows (a few
    groups in flight, and a last group and chunk shorter than the others)."""
    return int(request.param)


def sample(rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((rows, cols)).astype(np.float32)


def fail_on_call(
    monkeypatch: pytest.MonkeyPatch, pipe: Pipeline, stage: str, n: int, error: Exception
) -> None:
    """Make the ``n``-th call of the pipeline engine's ``stage`` raise ``error`` (injected)."""
    original = getattr(pipe._engine, stage)
    calls = [0]

    def failing(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise error
        return original(*args)

    monkeypatch.setattr(pipe._engine, stage, failing)


def check_nothing_held(pool: CudaStreamPool, pipe: Pipeline) -> None:
    stats = pool.stats()
    assert stats.leased == 0
    assert stats.events.in_use == 0
    assert pipe.buffers_in_use == 0


def test_run_equals_serial_and_reference(big_pool: CudaStreamPool, min_copy: int) -> None:
    data = sample()
    pipe = Pipeline(
        big_pool,
        double_plus_one,
        chunk_bytes=64 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=min_copy,
    )
    out = pipe.run(data)
    serial = pipe.run_serial(data)
    assert out.shape == data.shape and out.dtype == np.float32
    assert np.array_equal(out, serial)
    assert np.array_equal(out, data * 2 + 1)
    check_nothing_held(big_pool, pipe)


def test_chunks_of_one_row_and_one_chunk(big_pool: CudaStreamPool) -> None:
    data = sample(rows=9)
    tiny = Pipeline(big_pool, double_plus_one, chunk_bytes=1)  # a row is the least
    whole = Pipeline(big_pool, double_plus_one, chunk_bytes=1 << 30)
    assert np.array_equal(tiny.run(data), data * 2 + 1)
    assert np.array_equal(whole.run(data), data * 2 + 1)


def test_fn_may_change_dtype_and_row_shape(big_pool: CudaStreamPool, min_copy: int) -> None:
    data = sample()

    def first_two_columns_as_float64(x: Any) -> Any:
        return (x[:, :2] * 3).astype(np.float64)

    pipe = Pipeline(
        big_pool, first_two_columns_as_float64, chunk_bytes=100 * ROW_BYTES, min_copy_bytes=min_copy
    )
    out = pipe.run(data)
    assert out.dtype == np.float64 and out.shape == (ROWS, 2)
    assert np.array_equal(out, (data[:, :2] * 3).astype(np.float64))
    assert np.array_equal(out, pipe.run_serial(data))


def test_out_is_filled_and_returned(big_pool: CudaStreamPool, min_copy: int) -> None:
    data = sample()
    pipe = Pipeline(big_pool, double_plus_one, chunk_bytes=128 * ROW_BYTES, min_copy_bytes=min_copy)
    out = np.full_like(data, np.nan)
    assert pipe.run(data, out=out) is out
    assert np.array_equal(out, data * 2 + 1)


def test_a_pool_with_one_comm_stream_still_works(backend: str, min_copy: int) -> None:
    with CudaStreamPool(1, 1, 0, backend=backend) as pool:
        pipe = Pipeline(pool, double_plus_one, chunk_bytes=50 * ROW_BYTES, min_copy_bytes=min_copy)
        data = sample()
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        check_nothing_held(pool, pipe)


class Boom(Exception):
    pass


def failing_on(chunk_start: float) -> tuple[Callable[[Any], Any], Boom]:
    error = Boom("fn failed")

    def fn(x: Any) -> Any:
        if float(x[0, 0]) >= chunk_start:
            raise error
        return x * 2 + 1

    return fn, error


def test_exception_in_fn_propagates_and_frees_everything(
    big_pool: CudaStreamPool, min_copy: int
) -> None:
    data = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    fn, error = failing_on(float(data[500, 0]))
    pipe = Pipeline(big_pool, fn, chunk_bytes=100 * ROW_BYTES, min_copy_bytes=min_copy)
    for run in (pipe.run, pipe.run_serial):
        with pytest.raises(Boom) as raised:
            run(data)
        assert raised.value is error
        check_nothing_held(big_pool, pipe)
    # The pool is intact: the next pipeline gets every stream and event.
    again = Pipeline(big_pool, double_plus_one, chunk_bytes=100 * ROW_BYTES)
    assert np.array_equal(again.run(data), data * 2 + 1)


@pytest.mark.parametrize("failing", [0, 1, 3])
def test_a_failure_while_the_last_groups_come_home_frees_everything_once(
    failing: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a run gives each slot back as soon as its group is home; a wait
    that fails there (the ``failing``-th of the last four) still leaves nothing
    held, and gives nothing back twice."""
    with CudaStreamPool(backend="host") as pool:
        pipe = Pipeline(
            pool, double_plus_one, chunk_bytes=10 * ROW_BYTES, max_in_flight=4, min_copy_bytes=0
        )
        data = np.arange(100 * COLS, dtype=np.float32).reshape(100, COLS)  # 10 groups
        assert np.array_equal(pipe.run(data), data * 2 + 1)  # every event made once
        idle = pool.events.stats().idle
        # 6 waits in the loop, then the last 4.
        fail_on_call(monkeypatch, pipe, "synchronize", 10 - 4 + 1 + failing, Boom("failed"))
        with pytest.raises(Boom):
            pipe.run(data)
        monkeypatch.undo()
        check_nothing_held(pool, pipe)
        assert pool.events.stats().idle == idle
        assert np.array_equal(pipe.run(data), data * 2 + 1)


def count_device_buffers(pipe: Pipeline) -> list[int]:
    """Count the device buffers the pipeline's runs allocate from now on: ``[count]``."""
    made = [0]
    device_empty = pipe._engine.device_empty

    def counting(*args: Any) -> Any:
        made[0] += 1
        return device_empty(*args)

    pipe._engine.device_empty = counting  # type: ignore[method-assign]
    return made


def test_a_run_reuses_the_buffers_its_last_run_of_the_same_shapes_left(
    big_pool: CudaStreamPool, min_copy: int
) -> None:
    pipe = Pipeline(
        big_pool,
        double_plus_one,
        chunk_bytes=50 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=min_copy,
    )
    made = count_device_buffers(pipe)
    data = sample()
    out = np.empty_like(data)
    assert np.array_equal(pipe.run(data, out), data * 2 + 1)
    first = made[0]
    assert first >= 3 and pipe.buffers_kept == 3
    check_nothing_held(big_pool, pipe)  # buffers only: no lease or event is kept
    changed = data[::-1] * 3  # new contents, same shapes
    assert np.array_equal(pipe.run(changed, out), changed * 2 + 1)
    assert made[0] == first  # every buffer came back from the shelf
    # Another row shape allocates its own; the shelf keeps max_in_flight groups.
    wide = sample(cols=COLS + 1)
    assert np.array_equal(pipe.run(wide), wide * 2 + 1)
    assert made[0] > first and pipe.buffers_kept == 3
    assert np.array_equal(pipe.run_serial(data), data * 2 + 1)
    assert pipe.buffers_kept == 3
    pipe.release_buffers()
    assert pipe.buffers_kept == 0
    made[0] = 0
    assert np.array_equal(pipe.run(data, out), data * 2 + 1)
    assert made[0] == first
    check_nothing_held(big_pool, pipe)


def test_kept_and_running_groups_stay_within_max_in_flight_when_shapes_change(
    big_pool: CudaStreamPool,
) -> None:
    pipe = Pipeline(
        big_pool, double_plus_one, chunk_bytes=50 * ROW_BYTES, max_in_flight=3, min_copy_bytes=0
    )
    alive: list[weakref.ref[Any]] = []
    most = [0]
    device_empty = pipe._engine.device_empty

    def tracked(*args: Any) -> Any:
        buffer = device_empty(*args)
        alive.append(weakref.ref(buffer))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return buffer

    pipe._engine.device_empty = tracked  # type: ignore[method-assign]
    for cols in (COLS, COLS + 1, COLS, COLS + 2):
        data = sample(cols=cols)
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        gc.collect()
    assert most[0] == 3  # one input buffer per group in flight, never two runs' worth


def test_out_none_runs_reuse_their_gather_buffers(big_pool: CudaStreamPool) -> None:
    pipe = Pipeline(
        big_pool,
        lambda x: (x * 2 + 1).astype(np.float64),  # the output side differs from the input
        chunk_bytes=50 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=150 * ROW_BYTES,
    )
    made = count_device_buffers(pipe)
    data = sample()
    expected = (data * 2 + 1).astype(np.float64)
    assert np.array_equal(pipe.run(data), expected)
    first = made[0]
    assert np.array_equal(pipe.run(data), expected)
    assert made[0] == first  # gather buffers too: the output, once known, fits them
    # A float32 out does not fit them: the gather buffers are made again, results right.
    narrow = Pipeline(
        big_pool,
        double_plus_one,
        chunk_bytes=50 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=150 * ROW_BYTES,
    )
    narrow._shelf = pipe._shelf  # the same input buffers, offered to another output
    assert np.array_equal(narrow.run(data, np.empty_like(data)), data * 2 + 1)


def test_a_run_whose_output_comes_with_its_first_chunk_fits_the_buffers_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With out=None the output is known once the first chunk is copied out; buffers
    an earlier run made for another output are not gathered into after that."""
    with CudaStreamPool(backend="host") as pool:
        pipe = Pipeline(
            pool,
            lambda x: (x * 2 + 1).astype(np.float64),
            chunk_bytes=50 * ROW_BYTES,
            max_in_flight=1,  # one slot: its buffers come from the shelf before the output
            min_copy_bytes=150 * ROW_BYTES,
        )
        data = sample()
        pipe.run(data)  # leaves float64 gather buffers
        pipe.fn = double_plus_one  # float32 results from now on
        copy_out = pipe._engine.copy_out

        def copy_out_and_wait(lease: Any, *args: Any) -> None:
            copy_out(lease, *args)
            lease.synchronize()  # the output is known before the next group, as on a GPU

        monkeypatch.setattr(pipe._engine, "copy_out", copy_out_and_wait)
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        check_nothing_held(pool, pipe)


def test_a_failed_run_lets_its_pipeline_go_without_the_cycle_collector(
    big_pool: CudaStreamPool,
) -> None:
    failing = [False]

    def fn(x: Any) -> Any:
        if failing[0]:
            raise Boom("fn failed")
        return x * 2 + 1

    pipe = Pipeline(big_pool, fn, chunk_bytes=50 * ROW_BYTES)
    data = sample()
    pipe.run(data)
    gc.collect()
    gc.disable()
    try:
        failing[0] = True
        try:
            pipe.run(data)
        except Boom:
            pass
        else:
            raise AssertionError("the run did not fail")
        gone = weakref.ref(pipe)
        del pipe
        assert gone() is None  # and the buffers it kept with it
    finally:
        gc.enable()
    check_nothing_held(big_pool, Pipeline(big_pool, fn))


def test_a_failed_run_keeps_no_buffers(big_pool: CudaStreamPool, min_copy: int) -> None:
    failing = [False]

    def fn(x: Any) -> Any:
        if failing[0]:
            raise Boom("fn failed")
        return x * 2 + 1

    data = sample()
    pipe = Pipeline(big_pool, fn, chunk_bytes=50 * ROW_BYTES, min_copy_bytes=min_copy)
    pipe.run(data)
    assert pipe.buffers_kept > 0
    failing[0] = True
    with pytest.raises(Boom):
        pipe.run(data)
    assert pipe.buffers_kept == 0
    check_nothing_held(big_pool, pipe)
    failing[0] = False
    assert np.array_equal(pipe.run(data), data * 2 + 1)


def test_a_run_takes_its_leases_after_its_first_copy_and_gives_them_back_before_its_last_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So the device copies while the host takes and returns them."""
    with CudaStreamPool(backend="host", compute_streams=2, comm_streams=2) as pool:
        pipe = Pipeline(
            pool, double_plus_one, chunk_bytes=10 * ROW_BYTES, max_in_flight=4, min_copy_bytes=0
        )
        engine = pipe._engine
        leased_at_copies: list[int] = []
        leased_at_waits: list[int] = []
        copy_in, synchronize = engine.copy_in, engine.synchronize

        def counted_copy_in(*args: Any) -> None:
            leased_at_copies.append(pool.stats().leased)
            copy_in(*args)

        def counted_synchronize(*args: Any) -> None:
            leased_at_waits.append(pool.stats().leased)
            synchronize(*args)

        monkeypatch.setattr(engine, "copy_in", counted_copy_in)
        monkeypatch.setattr(engine, "synchronize", counted_synchronize)
        data = np.arange(100 * COLS, dtype=np.float32).reshape(100, COLS)  # 10 groups
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        assert leased_at_copies == [1] + [3] * 9  # copy-in alone, then copy-out and compute
        assert leased_at_waits == [3] * 6 + [0] * 4  # the last four groups: nothing held


def test_wrong_number_of_rows_is_a_clear_error(big_pool: CudaStreamPool, min_copy: int) -> None:
    pipe = Pipeline(
        big_pool, lambda x: x[:-1], chunk_bytes=100 * ROW_BYTES, min_copy_bytes=min_copy
    )
    with pytest.raises(ValueError, match="one row per input row"):
        pipe.run(sample())
    check_nothing_held(big_pool, pipe)


def test_changing_result_shape_between_chunks_is_an_error(
    big_pool: CudaStreamPool, min_copy: int
) -> None:
    def fn(x: Any) -> Any:
        return x if float(x[0, 0]) < 500 else x[:, :3]

    data = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) / COLS
    pipe = Pipeline(big_pool, fn, chunk_bytes=100 * ROW_BYTES, min_copy_bytes=min_copy)
    with pytest.raises(ValueError, match="same dtype and row shape"):
        pipe.run(data)
    check_nothing_held(big_pool, pipe)


def test_bad_arguments_name_the_argument(big_pool: CudaStreamPool, backend: str) -> None:
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        Pipeline(big_pool, double_plus_one, chunk_bytes=0)
    with pytest.raises(TypeError, match="chunk_bytes"):
        Pipeline(big_pool, double_plus_one, chunk_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_in_flight=0"):
        Pipeline(big_pool, double_plus_one, max_in_flight=0)
    with pytest.raises(ValueError, match="min_copy_bytes=-1"):
        Pipeline(big_pool, double_plus_one, min_copy_bytes=-1)
    with pytest.raises(TypeError, match="fn="):
        Pipeline(big_pool, "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pool="):
        Pipeline(object(), double_plus_one)  # type: ignore[arg-type]
    with (
        CudaStreamPool(2, 0, 0, backend=backend) as no_comm,
        pytest.raises(ValueError, match="comm_streams >= 1"),
    ):
        Pipeline(no_comm, double_plus_one)
    pipe = Pipeline(big_pool, double_plus_one)
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        pipe.run([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one row"):
        pipe.run(np.empty((0, 3), np.float32))
    with pytest.raises(ValueError, match="out needs 1000 rows"):
        pipe.run(sample(), out=np.empty((999, COLS), np.float32))
    read_only = np.empty((ROWS, COLS), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pipe.run(sample(), out=read_only)
    check_nothing_held(big_pool, pipe)


def test_at_most_max_in_flight_chunks_are_queued() -> None:
    # fn blocks on the first chunk; the run may queue max_in_flight chunks (a
    # copy each: min_copy_bytes=0) and must then wait for the first to come back.
    gate = threading.Event()

    def fn(x: np.ndarray) -> np.ndarray:
        if x[0, 0] == 0:
            gate.wait()
        return x + 1

    with CudaStreamPool(backend="host") as pool:
        pipe = Pipeline(pool, fn, chunk_bytes=10 * ROW_BYTES, max_in_flight=2, min_copy_bytes=0)
        queued: list[int] = []
        copy_in = pipe._engine.copy_in

        def counting_copy_in(*args: Any) -> None:
            queued.append(1)
            copy_in(*args)

        pipe._engine.copy_in = counting_copy_in  # type: ignore[method-assign]
        data = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
        result: list[np.ndarray] = []
        runner = threading.Thread(target=lambda: result.append(pipe.run(data)))
        runner.start()
        try:
            deadline = time.monotonic() + 10
            while len(queued) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # time enough to queue more, were it allowed to
            assert len(queued) == 2
            assert pool.stats().acquisitions == 3  # one copy-in, compute, copy-out lease a run
            assert pipe.buffers_in_use == 2
        finally:
            gate.set()
            runner.join()
        assert np.array_equal(result[0], data + 1)


def test_small_chunks_are_copied_in_groups_of_min_copy_bytes() -> None:
    calls = {"copy_in": 0, "gather": 0, "copy_out": 0}
    per_group = DEFAULT_MIN_COPY_BYTES // (64 << 10)
    with CudaStreamPool(backend="host") as pool:
        pipe = Pipeline(pool, double_plus_one, chunk_bytes=64 << 10)
        engine = pipe._engine
        for name in calls:
            stage = getattr(engine, name)

            def counted(*args: Any, stage: Any = stage, name: str = name) -> None:
                calls[name] += len(args[1]) if name == "gather" else 1  # gather: its results
                stage(*args)

            setattr(engine, name, counted)
        data = np.arange(4 * per_group * (16 << 10), dtype=np.float32)  # 4 groups
        out = np.empty_like(data)
        assert pipe.run(data, out) is out
        assert np.array_equal(out, data * 2 + 1)
        chunks = 4 * per_group
        assert calls == {"copy_in": 4, "gather": chunks, "copy_out": 4}
        # Without out, the first chunk goes alone: its result says what to gather into.
        calls.update(dict.fromkeys(calls, 0))
        assert np.array_equal(pipe.run(data), data * 2 + 1)
        assert calls == {"copy_in": 5, "gather": chunks - 1, "copy_out": 5}
        check_nothing_held(pool, pipe)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 60),
    cols=st.integers(1, 3),
    chunk_rows=st.integers(1, 9),
    group_chunks=st.integers(0, 5),
    max_in_flight=st.integers(1, 4),
    give_out=st.booleans(),
    widen=st.booleans(),
)
def test_any_chunking_gives_the_serial_result_and_holds_nothing(
    rows: int,
    cols: int,
    chunk_rows: int,
    group_chunks: int,
    max_in_flight: int,
    give_out: bool,
    widen: bool,
) -> None:
    # Groups of 0 (a copy per chunk) to 5 chunks, short last chunks and
    # groups, fn changing the dtype and the row shape, out given or allocated.
    row_bytes = cols * 4

    def fn(x: np.ndarray) -> np.ndarray:
        y = x[:, ::-1] * 2 + 1
        return np.concatenate([y, y[:, :1]], axis=1).astype(np.float64) if widen else y

    data = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    expected = fn(data)
    with CudaStreamPool(backend="host") as pool:
        pipe = Pipeline(
            pool,
            fn,
            chunk_bytes=chunk_rows * row_bytes,
            max_in_flight=max_in_flight,
            min_copy_bytes=group_chunks * chunk_rows * row_bytes,
        )
        out = np.full_like(expected, np.nan) if give_out else None
        result = pipe.run(data, out)
        assert result.dtype == expected.dtype and np.array_equal(result, expected)
        if out is not None:
            assert result is out
        assert np.array_equal(pipe.run_serial(data), expected)
        # Again with out the other way: a run takes the buffers the last left,
        # and leaves the output side behind where it does not fit.
        again = None if give_out else np.full_like(expected, np.nan)
        assert np.array_equal(pipe.run(data, again), expected)
        check_nothing_held(pool, pipe)


def test_concurrent_runs_share_the_pool(big_pool: CudaStreamPool) -> None:
    data = sample()
    pipes = [
        Pipeline(big_pool, lambda x, k=k: x * k, chunk_bytes=50 * ROW_BYTES) for k in range(1, 5)
    ]
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = pipes[k - 1].run(data)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(1, 5):
        assert np.array_equal(results[k], data * k)
    assert big_pool.stats().leased == 0


def test_host_fn_gets_numpy_and_must_return_it() -> None:
    with CudaStreamPool(backend="host") as pool:
        seen: list[type] = []

        def record(x: np.ndarray) -> np.ndarray:
            seen.append(type(x))
            return x

        Pipeline(pool, record, chunk_bytes=500 * ROW_BYTES).run(sample())
        assert seen == [np.ndarray, np.ndarray]
        pipe = Pipeline(pool, lambda x: [1, 2], chunk_bytes=500 * ROW_BYTES)
        with pytest.raises(TypeError, match=r"must return a numpy\.ndarray"):
            pipe.run(sample())
        check_nothing_held(pool, pipe)


# -- GPU only ------------------------------------------------------------------


@pytest.fixture
def gpu_pool() -> Iterator[CudaStreamPool]:
    p = CudaStreamPool(backend="cupy")
    try:
        yield p
    finally:
        p.close()


@pytest.mark.gpu
def test_gpu_pinned_and_pageable_arrays_give_the_same_result(gpu_pool: CudaStreamPool) -> None:
    pipe = Pipeline(gpu_pool, double_plus_one, chunk_bytes=64 * ROW_BYTES)
    data = sample()
    pinned = pipe.empty_host(data.shape, data.dtype)
    pinned[:] = data
    pinned_out = pipe.empty_host(data.shape, data.dtype)
    expected = data * 2 + 1
    # pinned in and out: direct copies; pageable ones go through staging buffers
    assert pipe._engine.is_direct(pinned) and not pipe._engine.is_direct(data)
    for source in (pinned, data):
        for out in (pinned_out, np.empty_like(data), None):
            assert np.array_equal(pipe.run(source, out=out), expected)
    assert np.array_equal(pipe.run_serial(data), expected)
    check_nothing_held(gpu_pool, pipe)


@pytest.mark.gpu
@pytest.mark.parametrize("min_copy", [0, 4 * 64 * 64 * 4], ids=["copy-per-chunk", "copy-groups"])
def test_gpu_stages_wait_for_a_slow_compute(gpu_pool: CudaStreamPool, min_copy: int) -> None:
    import cupy

    from cupystreams._bench.workloads import cycles_per_us, gpu_spin_kernel

    spin = gpu_spin_kernel()
    cycles = np.int64(2_000 * cycles_per_us(cupy.cuda.runtime.getDevice()))

    def slow(x: Any) -> Any:
        # 2 ms of spinning before the result exists: a copy-out that does
        # not wait for the compute reads an unwritten array.
        spin((1,), (32,), (cycles, None))
        return x * 3 - 2

    data = np.arange(64 * 1024, dtype=np.float32).reshape(-1, 64)
    pipe = Pipeline(
        gpu_pool, slow, chunk_bytes=64 * 64 * 4, max_in_flight=2, min_copy_bytes=min_copy
    )
    out = pipe.run(data)
    assert np.array_equal(out, data * 3 - 2)


@pytest.mark.gpu
def test_gpu_compute_waits_for_its_copy_in(gpu_pool: CudaStreamPool) -> None:
    # 32 MiB chunks take about 0.7 ms to copy in, and fn's kernel is queued
    # microseconds after the copy: a compute that does not wait for the copy
    # reads a buffer that still holds garbage or the previous chunk.
    pipe = Pipeline(gpu_pool, double_plus_one, chunk_bytes=32 << 20, max_in_flight=2)
    data = pipe.empty_host((4 * (8 << 20),), np.float32)
    out = pipe.empty_host(data.shape, np.float32)
    for value in (1.0, -3.0):
        data[:] = np.arange(data.size, dtype=np.float32) % 1024 * value
        out[:] = np.nan
        pipe.run(data, out)
        assert np.array_equal(out, data * 2 + 1)


@pytest.mark.gpu
def test_gpu_fn_runs_on_a_pooled_compute_stream(gpu_pool: CudaStreamPool) -> None:
    import cupy

    compute_ptrs = {s.stream.ptr for s in gpu_pool._streams if s.kind.value == "compute"}
    seen: list[int] = []

    def fn(x: Any) -> Any:
        seen.append(cupy.cuda.get_current_stream().ptr)
        return x

    Pipeline(gpu_pool, fn, chunk_bytes=100 * ROW_BYTES).run(sample())
    assert len(seen) == 10 and set(seen) <= compute_ptrs


@pytest.mark.gpu
def test_gpu_failure_returns_device_memory(gpu_pool: CudaStreamPool, min_copy: int) -> None:
    import cupy

    def fn(x: Any) -> Any:
        if float(x[0, 0]) >= 700 * COLS:
            raise Boom("fn failed")  # a fresh error: no traceback kept past the test
        return x * 2 + 1

    data = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
    pipe = Pipeline(gpu_pool, fn, chunk_bytes=100 * ROW_BYTES, min_copy_bytes=min_copy)
    mempool = cupy.get_default_memory_pool()
    gc.collect()  # an earlier test's pipeline may still hold the buffers it kept
    before = mempool.used_bytes()
    with pytest.raises(Boom):
        pipe.run(data)
    gc.collect()  # the traceback's frames held the failing chunk's view
    assert mempool.used_bytes() == before
    check_nothing_held(gpu_pool, pipe)


@pytest.mark.gpu
def test_gpu_kept_buffers_are_device_memory_that_release_gives_back(
    gpu_pool: CudaStreamPool, min_copy: int
) -> None:
    import cupy

    data = sample()
    pipe = Pipeline(
        gpu_pool,
        double_plus_one,
        chunk_bytes=100 * ROW_BYTES,
        max_in_flight=3,
        min_copy_bytes=min_copy,
    )
    out = pipe.empty_host(data.shape, data.dtype)
    mempool = cupy.get_default_memory_pool()
    gc.collect()  # an earlier test's pipeline may still hold the buffers it kept
    before = mempool.used_bytes()
    assert np.array_equal(pipe.run(data, out), data * 2 + 1)
    gc.collect()
    group_bytes = 100 * ROW_BYTES * (1 if min_copy == 0 else 2)  # input (and gathered results)
    assert mempool.used_bytes() - before >= 3 * group_bytes
    kept = mempool.used_bytes()
    changed = data * -1
    assert np.array_equal(pipe.run(changed, out), changed * 2 + 1)
    gc.collect()
    assert mempool.used_bytes() == kept  # the second run copied into the same buffers
    pipe.release_buffers()
    gc.collect()
    assert mempool.used_bytes() == before
    check_nothing_held(gpu_pool, pipe)


@pytest.mark.gpu
def test_gpu_rejects_a_host_result(gpu_pool: CudaStreamPool) -> None:
    pipe = Pipeline(gpu_pool, lambda x: x.get(), chunk_bytes=100 * ROW_BYTES)
    with pytest.raises(TypeError, match="device array"):
        pipe.run(sample())
    check_nothing_held(gpu_pool, pipe)


@pytest.mark.gpu
@pytest.mark.requires_module("torch")
def test_gpu_torch_fn(gpu_pool: CudaStreamPool) -> None:
    import cupy
    import torch

    def fn(x: Any) -> Any:
        stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)
        with torch.cuda.stream(stream):
            return torch.as_tensor(x, device="cuda") * 2 + 1

    data = sample()
    pipe = Pipeline(gpu_pool, fn, chunk_bytes=64 * ROW_BYTES)
    assert np.array_equal(pipe.run(data), data * 2 + 1)


@pytest.mark.gpu
@pytest.mark.requires_module("numba")
def test_gpu_numba_fn(gpu_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch) -> None:
    import cupy
    from numba import cuda

    # numba-cuda 0.30 overloads np.row_stack, which NumPy 2.4 removed: without
    # the alias it cannot compile any kernel. A test-side workaround.
    monkeypatch.setattr(np, "row_stack", np.vstack, raising=False)

    @cuda.jit  # type: ignore[misc]
    def double_plus_one_kernel(x: Any, y: Any) -> None:
        i, j = cuda.grid(2)
        if i < x.shape[0] and j < x.shape[1]:
            y[i, j] = x[i, j] * 2 + 1

    def fn(x: Any) -> Any:
        y = cupy.empty_like(x)
        stream = cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        blocks = ((x.shape[0] + 15) // 16, (x.shape[1] + 15) // 16)
        double_plus_one_kernel[blocks, (16, 16), stream](x, y)
        return y

    data = sample()
    pipe = Pipeline(gpu_pool, fn, chunk_bytes=64 * ROW_BYTES)
    assert np.array_equal(pipe.run(data), data * 2 + 1)


def test_a_failed_staging_copy_leaves_no_piece_still_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A staging copy split over host threads raises only once no piece writes
    any more: the buffer it wrote into may be freed, or handed back, at once."""
    from cupystreams import _pipeline_engines as engines

    monkeypatch.setattr(engines, "_COPY_THREADS", 2)
    monkeypatch.setattr(engines, "_copier", None)  # a copier of two threads
    second_started = threading.Event()
    writes: list[float] = []
    copyto = np.copyto

    def piece(dst: np.ndarray, src: np.ndarray) -> None:
        if src[0] == 0:
            second_started.wait(5)
            raise RuntimeError("the first piece failed")
        second_started.set()
        time.sleep(0.05)  # still copying when the first piece fails
        copyto(dst, src)
        writes.append(time.monotonic())

    monkeypatch.setattr(np, "copyto", piece)
    src = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: two pieces
    with pytest.raises(RuntimeError, match="the first piece failed"):
        engines.host_copy(np.empty_like(src), src)
    raised = time.monotonic()
    time.sleep(0.1)
    assert len(writes) == 1 and writes[0] <= raised, "a piece wrote after host_copy raised"


def test_the_sizes_may_change_between_runs_and_are_checked_as_they_are_set() -> None:
    with CudaStreamPool(2, 2, 0, backend="host") as pool:
        pipe = Pipeline(pool, lambda x: x + 1, chunk_bytes=400)
        data = np.arange(1000, dtype=np.float32)
        for name, bad in (("max_in_flight", 0), ("chunk_bytes", 0), ("min_copy_bytes", -1)):
            with pytest.raises(ValueError, match=name):
                setattr(pipe, name, bad)
        assert (pipe.max_in_flight, pipe.chunk_bytes, pipe.min_copy_bytes) == (4, 400, 8 << 20)
        pipe.max_in_flight, pipe.chunk_bytes = 2, 800
        assert np.array_equal(pipe.run(data), data + 1)
        with pytest.raises(AttributeError):
            pipe.page_lock = False  # type: ignore[misc]  # the engine is made with it
