"""pool.trace(): one device-timed span per lease, exports, and a free fast path."""

from __future__ import annotations

import itertools
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cupystreams import CudaStreamPool, PoolClosedError, StreamLease
from cupystreams.pipeline import Pipeline


def busy(lease: StreamLease, backend: str, ms: float = 5.0) -> None:
    """Queue ``ms`` of work on the lease's stream."""
    if backend == "host":
        lease.launch_host_func(lambda: time.sleep(ms / 1e3))
        return
    import cupy

    from cupystreams._bench.workloads import cycles_per_us, gpu_spin_kernel

    cycles = np.int64(ms * 1e3 * cycles_per_us(cupy.cuda.runtime.getDevice()))
    with lease.cupy_stream:
        gpu_spin_kernel()((1,), (32,), (cycles, None))


def test_one_span_per_lease_in_stream_order(pool: CudaStreamPool, backend: str) -> None:
    with pool.trace() as trace:
        first = pool.acquire_compute()
        busy(first, backend)
        first.release()
        with pool.acquire_comm() as comm:
            busy(comm, backend)
        second = pool.acquire_compute()
        stream_id = second.stream.stream_id
        pool.release(second)  # the pool's release is traced too
        with pool.high_priority_context():
            pass
    spans = trace.spans
    assert [s.kind for s in spans] == ["compute", "comm", "compute", "high_priority"]
    assert [s.index for s in spans] == [0, 1, 2, 3]
    assert all(0 <= s.start_ms <= s.end_ms for s in spans)
    assert spans[2].stream_id == stream_id
    # Leases of one stream follow each other on the device.
    same = [s for s in spans if s.stream_id == spans[0].stream_id]
    for earlier, later in itertools.pairwise(same):
        assert later.start_ms >= earlier.end_ms - 1e-3
    assert trace.unfinished == 0
    assert {lane.stream_id for lane in trace.rows} == {s.stream_id for s in pool._streams}


def test_tracing_off_leaves_the_fast_path_untouched(pool: CudaStreamPool) -> None:
    before = dict(vars(pool))
    with pool.trace():
        assert "acquire_compute" in vars(pool)
        traced = pool.acquire_compute()
        assert type(traced) is not StreamLease and isinstance(traced, StreamLease)
        traced.release()
    assert vars(pool).keys() == before.keys()
    assert pool.acquire_compute == CudaStreamPool.acquire_compute.__get__(pool)
    lease = pool.acquire_compute()
    assert type(lease) is StreamLease
    lease.release()


def test_one_trace_at_a_time(pool: CudaStreamPool) -> None:
    with pool.trace(), pytest.raises(RuntimeError, match="already being traced"), pool.trace():
        pass
    with pool.trace() as again:
        pass
    assert again.spans == []


def test_spans_are_read_after_the_block(pool: CudaStreamPool) -> None:
    with pool.trace() as trace, pytest.raises(RuntimeError, match="still recording"):
        trace.spans  # noqa: B018


def test_leases_crossing_the_trace_boundaries(pool: CudaStreamPool) -> None:
    before = pool.acquire_compute()
    with pool.trace() as trace:
        before.release()  # acquired untraced: no span
        during = pool.acquire_comm()
    during.release()  # released after the trace: counted, not a span
    assert trace.spans == []
    assert trace.unfinished == 1
    assert pool.stats().leased == 0


def test_tracing_a_closed_pool_is_an_error(backend: str) -> None:
    pool = CudaStreamPool(1, 1, 0, backend=backend)
    pool.close()
    with pytest.raises(PoolClosedError), pool.trace():
        pass


def test_chrome_trace_and_timeline_files(pool: CudaStreamPool, tmp_path: Path) -> None:
    with pool.trace() as trace:
        for _ in range(3):
            with pool.acquire_compute():
                pass
    path = tmp_path / "run.trace.json"
    trace.save_chrome_trace(path)
    document = json.loads(path.read_text())
    events = document["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    lanes = [e for e in events if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(spans) == 3 and len(lanes) == len(pool._streams)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["tid"] for e in spans} <= {e["tid"] for e in lanes}
    png = tmp_path / "timeline.png"
    trace.save_timeline(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nvtx_ranges_when_nvtx_is_installed(
    pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("nvtx")

    def start_range(message: str, domain: str) -> int:
        calls.append(("start", (message, domain)))
        return len(calls)

    fake.start_range = start_range  # type: ignore[attr-defined]
    fake.end_range = lambda handle: calls.append(("end", handle))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    with pool.trace():
        with pool.acquire_compute() as lease:
            name = f"compute#{lease.stream.stream_id}"
        with pool.acquire_comm():
            pass
    assert calls[0] == ("start", (name, "cupystreams"))
    assert calls[1] == ("end", 1)
    assert calls[2][0] == "start" and calls[2][1][0].startswith("comm#")
    assert calls[3] == ("end", 3)


def test_a_traced_pipeline_has_three_spans_per_chunk(backend: str) -> None:
    with CudaStreamPool(backend=backend) as pool:
        pipe = Pipeline(pool, lambda x: x + 1, chunk_bytes=4096, min_copy_bytes=0)
        data = np.arange(4 * 1024, dtype=np.float32)
        with pool.trace() as trace:
            out = pipe.run(data)
        assert np.array_equal(out, data + 1)
        stages = [(s.stage, s.kind) for s in trace.spans]
        assert stages.count(("copy-in", "comm")) == 4
        assert stages.count(("compute", "compute")) == 4
        assert stages.count(("copy-out", "comm")) == 4
        assert len(stages) == 12, "the run's leases are drawn as their stages, not twice"
        # Copy-in and copy-out kept to their own comm streams.
        comm_lanes = {s.stream_id for s in trace.spans if s.kind == "comm"}
        assert len(comm_lanes) == 2
        # Chunks copied as one group: one span per copy, and one for the fn
        # calls of the group (the stream is made current once for all of them).
        grouped = Pipeline(pool, lambda x: x + 1, chunk_bytes=4096, min_copy_bytes=16384)
        with pool.trace() as trace:
            grouped.run(data, out)
        assert np.array_equal(out, data + 1)
        stages = [(s.stage, s.kind) for s in trace.spans]
        assert stages.count(("copy-in", "comm")) == 1
        assert stages.count(("compute", "compute")) == 1
        assert stages.count(("copy-out", "comm")) == 1
