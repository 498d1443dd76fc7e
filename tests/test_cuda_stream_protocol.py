"""The core takes any ``__cuda_stream__`` object as a stream, with no adapter imported.

``lease.wait()``, ``pool.record_event()`` and ``PooledEvent.record()`` must
order against a foreign stream given only through the protocol: a small fake
class over a real CuPy stream, and torch's own streams (its default stream is
the legacy stream, pointer 0). A slow producer on the foreign stream makes a
missing wait show as wrong data.
"""

from __future__ import annotations

from typing import Any

import pytest
from gpu_helpers import raw_view, slow_fill, spin

from cupystreams import CudaStreamPool

N = 1 << 16


class ForeignStream:
    """Exposes a stream pointer through the protocol and nothing else."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._ptr)


class BadStream:
    def __init__(self, result: object) -> None:
        self._result = result

    def __cuda_stream__(self) -> object:
        return self._result


def _zeros(n: int) -> Any:
    import cupy

    array = cupy.zeros(n, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()
    return array


def _read_on(lease: Any, ptr: int, owner: object) -> Any:
    """Copy N float32s at ``ptr`` on the lease, through a view that knows no stream."""
    with lease.cupy_stream:
        return raw_view(ptr, N, owner=owner).copy()


@pytest.mark.gpu
def test_lease_waits_for_a_protocol_stream(gpu_pool: CudaStreamPool) -> None:
    import cupy

    producer = cupy.cuda.Stream(non_blocking=True)
    x = _zeros(N)
    with gpu_pool.acquire_compute() as lease:
        _read_on(lease, x.data.ptr, x)  # load the consumer before the race
        lease.synchronize()
        slow_fill(x.data.ptr, N, 5.0, producer)
        lease.wait(ForeignStream(producer.ptr))
        out = _read_on(lease, x.data.ptr, x)
        lease.synchronize()
    assert bool(cupy.all(out == 5.0)), "the lease did not wait for the protocol stream"


@pytest.mark.gpu
def test_events_record_a_protocol_stream(gpu_pool: CudaStreamPool) -> None:
    import cupy

    producer = cupy.cuda.Stream(non_blocking=True)
    x = _zeros(N)
    with gpu_pool.acquire_compute() as lease:
        _read_on(lease, x.data.ptr, x)  # load the consumer before the race
        lease.synchronize()
        slow_fill(x.data.ptr, N, 6.0, producer)
        event = gpu_pool.record_event(ForeignStream(producer.ptr))
        assert not event.query(), "the event was not recorded behind the slow producer"
        lease.wait_event(event)
        out = _read_on(lease, x.data.ptr, x)
        lease.synchronize()
    event.release()
    assert bool(cupy.all(out == 6.0))
    with gpu_pool.events.event_context() as again:
        spin(producer, ms=20)
        again.record(ForeignStream(producer.ptr))
        assert not again.query()
        again.synchronize()
        assert again.query()


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("result", "message"),
    [((1, 0), "version"), ("not a tuple", "tuple"), ((0, 1.5), "tuple")],
)
def test_a_malformed_protocol_result_is_a_type_error(
    gpu_pool: CudaStreamPool, result: object, message: str
) -> None:
    with gpu_pool.acquire_compute() as lease, pytest.raises(TypeError, match=message):
        lease.wait(BadStream(result))


@pytest.mark.gpu
@pytest.mark.requires_module("torch")
@pytest.mark.parametrize("which", ["default", "side"])
def test_lease_waits_for_a_torch_stream_without_an_adapter(
    gpu_pool: CudaStreamPool, which: str
) -> None:
    import cupy
    import torch

    torch_stream = torch.cuda.default_stream() if which == "default" else torch.cuda.Stream()
    assert hasattr(torch_stream, "__cuda_stream__")
    t = torch.zeros(N, device="cuda")
    with gpu_pool.acquire_compute() as lease:
        with torch.cuda.stream(torch_stream):  # load producer and consumer before the race
            t.fill_(0.0)
        _read_on(lease, t.data_ptr(), t)
        torch.cuda.synchronize()
        lease.synchronize()
        with torch.cuda.stream(torch_stream):
            spin(torch_stream.cuda_stream)
            t.fill_(4.0)  # torch's write lands tens of ms late
        lease.wait(torch_stream)
        out = _read_on(lease, t.data_ptr(), t)
        lease.synchronize()
    assert bool(cupy.all(out == 4.0)), f"the lease did not wait for torch's {which} stream"


@pytest.mark.gpu
@pytest.mark.requires_module("torch")
def test_an_event_records_torch_s_default_stream(gpu_pool: CudaStreamPool) -> None:
    import torch

    with torch.cuda.stream(torch.cuda.default_stream()):
        spin(0, ms=20)
        event = gpu_pool.record_event(torch.cuda.default_stream())
    try:
        assert not event.query(), "the event missed the work on the legacy stream"
        event.synchronize()
        assert event.query()
    finally:
        event.release()
