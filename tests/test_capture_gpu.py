"""pool.capture() on a GPU: CuPy and torch captures whose side work runs on leases.

Each step races deliberately slow work (``gpu_helpers``: kernels that spin
~50 ms first) so that a join the pool leaves out shows: without the fork a
side lease reads the origin's input before it is written (and its work is not
even captured), and without the join-back the capture cannot end. The step
runs eagerly with explicit waits, then is captured without them (the pool's
joins must order it) and replayed on new input; every replay must equal the
eager result. Kernels run once eagerly before any capture: CUDA loads a
kernel on its first launch, which a capture must not do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import pytest
from gpu_helpers import gpu_and, slow_copy, spin
from reliability_helpers import wait_until

from cupystreams import CapturedGraph, CudaStreamPool, StreamLease
from cupystreams._backends._cupy import CupyBackend

pytestmark = pytest.mark.gpu

N = 1 << 16
INPUTS = (3.0, 7.0, 11.0)  # the step's input, a new one for each run


@dataclass
class Buffers:
    """Everything the step touches, allocated before any capture (a capture
    replays pointers, and an allocation inside one could break it)."""

    src: Any
    x: Any
    a: Any
    b: Any
    out: Any

    def ptr(self, name: str) -> int:
        array = getattr(self, name)
        return int(array.data_ptr() if hasattr(array, "data_ptr") else array.data.ptr)


def cupy_buffers() -> Buffers:
    import cupy

    arrays = [cupy.zeros(N, dtype=cupy.float32) for _ in range(5)]
    cupy.cuda.runtime.deviceSynchronize()
    return Buffers(*arrays)


def cupy_step(pool: CudaStreamPool, origin: StreamLease, bufs: Buffers, explicit: bool) -> None:
    """out = (2x + 1) + (3x - 1) = 5 src, the two terms on side leases.

    ``explicit`` adds the waits an eager step needs; a captured step has none.
    """
    import cupy

    slow_copy(bufs.ptr("src"), bufs.ptr("x"), N, origin)  # ~50 ms, then x = src
    for out, scale, shift in ((bufs.a, 2, 1), (bufs.b, 3, -1)):
        with pool.acquire_compute() as side:  # CuPy's current stream inside
            if explicit:
                side.wait(origin)
            spin(side)  # slow side work: the origin must wait for it
            cupy.multiply(bufs.x, scale, out=out)
            out += shift
            if explicit:
                origin.wait(side)
    with origin.cupy_stream:
        cupy.add(bufs.a, bufs.b, out=bufs.out)


def test_a_cupy_capture_replays_what_the_eager_step_computes(gpu_pool: CudaStreamPool) -> None:
    import cupy

    bufs = cupy_buffers()
    with gpu_pool.acquire_comm() as origin:
        with origin.cupy_stream:
            bufs.src.fill(INPUTS[0])
        cupy_step(gpu_pool, origin, bufs, explicit=True)
        origin.synchronize()
        eager = float(bufs.out.min()), float(bufs.out.max())
        assert eager == (5 * INPUTS[0],) * 2

        for name in ("x", "a", "b", "out"):  # nothing of the eager run is left to find
            getattr(bufs, name).fill(0)
        cupy.cuda.runtime.deviceSynchronize()
        with gpu_pool.capture(origin) as graph:
            cupy_step(gpu_pool, origin, bufs, explicit=False)
        assert isinstance(graph, CapturedGraph)
        assert float(bufs.out.max()) == 0.0, "captured work ran during the capture"
    assert gpu_pool.stats().compute.leased == 0, "the parked streams came back"

    with graph, gpu_pool.acquire_high_priority() as launch:
        for value in INPUTS:
            with launch.cupy_stream:
                bufs.src.fill(value)
            graph.launch(launch)
            launch.synchronize()
            assert (float(bufs.out.min()), float(bufs.out.max())) == (5 * value,) * 2, (
                f"the replay for input {value} differs from the eager step"
            )


def test_a_cupy_graph_launches_on_any_stream_argument(gpu_pool: CudaStreamPool) -> None:
    import cupy

    data = cupy.zeros(N, dtype=cupy.float32)
    cupy.cuda.runtime.deviceSynchronize()
    with gpu_pool.acquire_comm() as origin:
        with origin.cupy_stream:
            data += 1  # loads the kernel before the capture
        origin.synchronize()
        with gpu_pool.capture(origin) as graph, gpu_pool.acquire_compute():
            data += 1
    assert graph is not None
    stream = cupy.cuda.Stream(non_blocking=True)

    class Protocol:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, stream.ptr)

    with graph, gpu_pool.acquire_compute() as lease:
        for target in (lease, lease.stream, stream, stream.ptr, Protocol(), 0):
            graph.launch(target)
        graph.launch()  # the current stream: the lease, entered
        cupy.cuda.runtime.deviceSynchronize()
    assert float(data.min()) == float(data.max()) == 1 + 7


def test_a_cupy_lease_left_joined_ends_the_capture_cleanly(gpu_pool: CudaStreamPool) -> None:
    from cupystreams import LeaseError

    with gpu_pool.acquire_comm() as origin:
        with pytest.raises(LeaseError, match="still joined") as info, gpu_pool.capture(origin):
            left = gpu_pool.acquire_compute()
        assert repr(left.stream) in str(info.value) and __file__ in str(info.value)
        for stream in (origin, left):
            assert not stream.cupy_stream.is_capturing(), "a stream was left capturing"
        left.release()
    gpu_pool.sync_all()
    assert gpu_pool.stats().compute.leased == 0


@dataclass
class TorchSetup:
    adapter: Any
    bufs: Buffers


def torch_step(pool: CudaStreamPool, setup: TorchSetup, explicit: bool) -> None:
    """The CuPy step's shape with torch ops: x = src (slow) on torch's current stream,
    the two terms on leases (made torch's current stream by the adapter), then out."""
    import torch

    adapter, bufs = setup.adapter, setup.bufs
    main = torch.cuda.current_stream()
    slow_copy(bufs.ptr("src"), bufs.ptr("x"), N, main.cuda_stream)
    for out, scale, shift in ((bufs.a, 2.0, 1.0), (bufs.b, 3.0, -1.0)):
        with pool.acquire_compute() as side:
            if explicit:
                adapter.lease_waits_for_torch(side, main)
            spin(side)
            with adapter.use(side):
                torch.mul(bufs.x, scale, out=out)
                out.add_(shift)
            if explicit:
                adapter.torch_waits_for_lease(side, main)
    torch.add(bufs.a, bufs.b, out=bufs.out)


def as_stream_argument(torch_stream: Any) -> Any:
    """A torch stream as the pool takes it: itself where it speaks ``__cuda_stream__``."""
    if hasattr(torch_stream, "__cuda_stream__"):
        return torch_stream
    return torch_stream.cuda_stream


@gpu_and("torch")
def test_a_torch_capture_with_side_work_on_leases_replays_the_eager_result(
    gpu_pool: CudaStreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    adapter = importlib.import_module("cupystreams.adapters.torch")
    device = torch.device("cuda", gpu_pool.device)
    bufs = Buffers(*(torch.zeros(N, dtype=torch.float32, device=device) for _ in range(5)))
    torch.cuda.synchronize()  # the zeros are in place before other streams use them
    setup = TorchSetup(adapter, bufs)
    for stream in gpu_pool._streams:
        adapter.as_torch_stream(stream)  # built once, before any capture
    eager_stream = torch.cuda.Stream(device)
    with torch.cuda.stream(eager_stream):
        bufs.src.fill_(INPUTS[0])
        torch_step(gpu_pool, setup, explicit=True)
    torch.cuda.synchronize()
    assert bufs.out.min().item() == bufs.out.max().item() == 5 * INPUTS[0]

    created: list[str] = []  # by any pool of the process
    for what in ("create_stream", "create_event"):
        make = getattr(CupyBackend, what)

        def counted(self: Any, *args: Any, what: str = what, make: Any = make) -> Any:
            created.append(what)
            return make(self, *args)

        monkeypatch.setattr(CupyBackend, what, counted)
    for tensor in (bufs.x, bufs.a, bufs.b, bufs.out):  # nothing of the eager run left to find
        tensor.zero_()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with (
        torch.cuda.graph(graph),  # torch's capture, in CUDA's global mode
        gpu_pool.capture(as_stream_argument(torch.cuda.current_stream())) as mine,
    ):
        assert mine is None, "the capture is torch's: no graph of ours"
        torch_step(gpu_pool, setup, explicit=False)
    assert created == [], "a stream or an event was created during the capture"
    wait_until(
        lambda: not gpu_pool._captures.busy(),
        timeout=5,
        what="the leases' streams came back once torch ended its capture",
    )
    assert gpu_pool.stats().compute.leased == 0
    for value in INPUTS:
        bufs.src.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert bufs.out.min().item() == bufs.out.max().item() == 5 * value, (
            f"the replay for input {value} differs from the eager step"
        )
    gpu_pool.sync_all()


@pytest.mark.gpu(count=2)
def test_a_lease_on_another_device_cannot_join() -> None:
    import cupy

    with (
        CudaStreamPool(1, 1, 0, backend="cupy", device=0) as pool0,
        CudaStreamPool(1, 1, 0, backend="cupy", device=1) as pool1,
    ):
        with cupy.cuda.Device(0):
            stream0 = cupy.cuda.Stream(non_blocking=True)
        with pool0.acquire_comm() as origin0:
            for origin in (origin0, stream0):
                with pytest.raises(ValueError, match=r"device 0.*cannot join"):
                    pool1.capture(origin)
            with pool0.capture(origin0) as graph, pool0.acquire_compute():
                pass
        assert graph is not None
        with graph, pool1.acquire_compute() as lease1, pytest.raises(ValueError, match="device"):
            graph.launch(lease1)
