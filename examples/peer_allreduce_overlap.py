"""All-reduce gradient buckets between two GPUs with the copy engines, on comm leases.

One process drives both GPUs of the host::

    python examples/peer_allreduce_overlap.py --check
    python examples/peer_allreduce_overlap.py --bench out.json

NCCL moves a collective's data with kernels, which take SMs from the matrix
products they overlap. Here the data moves with the copy engines instead, which
no kernel competes for. For every bucket each GPU's comm lease, once both GPUs'
compute leases have produced the bucket (events, waited on the device):

1. pulls the peer's copy of the half it owns (``cudaMemcpyPeerAsync`` over
   NVLink: a copy engine, no SMs),
2. adds it into its own half with a small kernel on ``--add-blocks`` blocks
   (a few SMs, for a short time: the only SM work of the reduction),
3. pushes the reduced half back to the peer (a copy engine again).

That is a reduce-scatter and an all-gather of two halves. The compute leases go
on with the next bucket meanwhile; nothing blocks the host until the step ends.

``--bench`` times compute alone, the reduction alone, both serially on one
stream per GPU, and both overlapped through the pool, and reports each as a
fraction of the bound max(compute, communication).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import cupy

from cupystreams import CudaStreamPool, StreamLease

# dst[i] += src[i] over float4s, grid-stride: any number of blocks covers n4.
_ADD_INTO = r"""
extern "C" __global__ void add_into(float4* dst, const float4* src, long long n4) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 a = dst[i], b = src[i];
        dst[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    }
}
"""
THREADS = 512


class Gpu:
    """One GPU's share of a training step: its matrices, buckets and pool."""

    def __init__(self, index: int, args: argparse.Namespace, stack: ExitStack) -> None:
        self.index = index
        self.pool = stack.enter_context(CudaStreamPool(1, 1, 1, device=index))
        elements = args.bucket_mib * (1 << 20) // 4
        self.half = elements // 2
        with cupy.cuda.Device(index):
            self.grads = [cupy.zeros(elements, cupy.float32) for _ in range(args.buckets)]
            # Where the peer's half lands before it is added: one per bucket.
            self.received = [cupy.empty(self.half, cupy.float32) for _ in range(args.buckets)]
            self.a = cupy.random.rand(args.size, args.size, dtype=cupy.float32).astype(cupy.float16)
            self.b = cupy.random.rand(args.size, args.size, dtype=cupy.float32).astype(cupy.float16)
            self.add_into = cupy.RawKernel(_ADD_INTO, "add_into")
            cupy.cuda.Device(index).synchronize()
        self.matmuls = args.matmuls
        self.add_blocks = args.add_blocks

    def mine(self, bucket: int) -> cupy.ndarray:
        """The half of ``bucket`` this GPU reduces: first half on GPU 0, second on GPU 1."""
        grad = self.grads[bucket]
        return grad[: self.half] if self.index == 0 else grad[self.half :]

    def theirs(self, bucket: int) -> cupy.ndarray:
        """The half of ``bucket`` the peer reduces."""
        grad = self.grads[bucket]
        return grad[self.half :] if self.index == 0 else grad[: self.half]

    def compute(self, bucket: int, stream: Any) -> None:
        """The backward work that produces ``grads[bucket]``, on ``stream``."""
        with cupy.cuda.Device(self.index), stream:
            out = self.a
            for _ in range(self.matmuls):
                out = out @ self.b
            # A value each GPU can predict: a reduction that did not wait would add zeros.
            self.grads[bucket].fill(float(self.index + 1 + bucket))

    def reduce(self, bucket: int, peer: Gpu, stream: Any) -> None:
        """Steps 1-3 of the module docstring for this GPU's half, on ``stream``."""
        mine, received = self.mine(bucket), self.received[bucket]
        with cupy.cuda.Device(self.index), stream:
            copy_peer(received, peer.theirs(bucket), stream)  # the peer's copy of my half
            n4 = mine.size // 4
            # 0: one float4 per thread, so that every block is short and the
            # scheduler can give SMs back to the products between blocks.
            blocks = self.add_blocks or -(-n4 // THREADS)
            self.add_into((blocks,), (THREADS,), (mine, received, cupy.int64(n4)))
            copy_peer(peer.theirs(bucket), mine, stream)


def copy_peer(dst: cupy.ndarray, src: cupy.ndarray, stream: Any) -> None:
    """Copy ``src`` into ``dst`` (on two devices) with a copy engine, on ``stream``."""
    cupy.cuda.runtime.memcpyPeerAsync(
        dst.data.ptr, dst.device.id, src.data.ptr, src.device.id, src.nbytes, stream.ptr
    )


def enable_peer_access(devices: list[int]) -> None:
    for device in devices:
        for peer in devices:
            if peer == device:
                continue
            if not cupy.cuda.runtime.deviceCanAccessPeer(device, peer):
                raise SystemExit(f"GPU {device} cannot access GPU {peer} directly (no P2P)")
            with cupy.cuda.Device(device):
                try:
                    cupy.cuda.runtime.deviceEnablePeerAccess(peer)
                except cupy.cuda.runtime.CUDARuntimeError as exc:
                    if "AlreadyEnabled" not in str(exc):
                        raise


def run_overlapped(gpus: list[Gpu], computes: list[StreamLease], comms: list[StreamLease]) -> None:
    pairs = list(zip(gpus, computes, comms, strict=True))
    for bucket in range(len(gpus[0].grads)):
        for gpu, compute, _ in pairs:
            gpu.compute(bucket, compute.cupy_stream)
        for gpu, _, comm in pairs:
            # Both GPUs' halves are read and written: wait for both producers.
            for producer in computes:
                comm.wait(producer)
            gpu.reduce(bucket, gpus[1 - gpu.index], comm.cupy_stream)
    for compute in computes:
        for comm in comms:
            compute.wait(comm)  # the step ends when every reduction is done


def run_serial(gpus: list[Gpu], computes: list[StreamLease]) -> None:
    """One stream per GPU; the two GPUs still meet at every bucket."""
    for bucket in range(len(gpus[0].grads)):
        for gpu, compute in zip(gpus, computes, strict=True):
            gpu.compute(bucket, compute.cupy_stream)
        computes[0].wait(computes[1])
        computes[1].wait(computes[0])
        for gpu, compute in zip(gpus, computes, strict=True):
            gpu.reduce(bucket, gpus[1 - gpu.index], compute.cupy_stream)
        computes[0].wait(computes[1])
        computes[1].wait(computes[0])


def time_ms(fn: Callable[[], None], devices: list[int], repeats: int) -> float:
    """Median wall time of ``fn`` in ms, every GPU idle at start and end, after two warm-ups."""

    def synchronize() -> None:
        for device in devices:
            cupy.cuda.Device(device).synchronize()

    samples = []
    for i in range(repeats + 2):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        if i >= 2:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def check(gpus: list[Gpu], computes: list[StreamLease], comms: list[StreamLease]) -> None:
    run_overlapped(gpus, computes, comms)
    for gpu in gpus:
        cupy.cuda.Device(gpu.index).synchronize()
        for bucket, grad in enumerate(gpu.grads):
            expected = sum(rank + 1 + bucket for rank in range(len(gpus)))
            with cupy.cuda.Device(gpu.index):
                low, high = float(grad.min()), float(grad.max())
            assert low == high == expected, f"GPU {gpu.index} bucket {bucket}: {low}..{high}"
    print(f"check passed: {len(gpus[0].grads)} buckets all-reduced over {len(gpus)} GPUs")


def bench(
    gpus: list[Gpu], computes: list[StreamLease], comms: list[StreamLease], repeats: int
) -> dict[str, Any]:
    devices = [gpu.index for gpu in gpus]
    buckets = range(len(gpus[0].grads))

    def compute_only() -> None:
        for bucket in buckets:
            for gpu, compute in zip(gpus, computes, strict=True):
                gpu.compute(bucket, compute.cupy_stream)

    def comm_only() -> None:
        for bucket in buckets:
            for gpu, comm in zip(gpus, comms, strict=True):
                gpu.reduce(bucket, gpus[1 - gpu.index], comm.cupy_stream)

    figures = {
        "compute_ms": time_ms(compute_only, devices, repeats),
        "comm_ms": time_ms(comm_only, devices, repeats),
        "serial_ms": time_ms(lambda: run_serial(gpus, computes), devices, repeats),
        "overlapped_ms": time_ms(lambda: run_overlapped(gpus, computes, comms), devices, repeats),
    }
    bound = max(figures["compute_ms"], figures["comm_ms"])
    figures["bound_ms"] = bound
    for name in ("serial", "overlapped"):
        figures[f"{name}_vs_bound"] = bound / figures[f"{name}_ms"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--matmuls", type=int, default=1)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument(
        "--add-blocks",
        type=int,
        default=0,
        help="blocks of the add kernel (grid-stride); 0: one short block per 512 float4s",
    )
    parser.add_argument(
        "--compute-priority",
        choices=("normal", "high"),
        default="normal",
        help="lease the compute streams at normal or high priority",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="verify the reduced values")
    parser.add_argument("--bench", metavar="JSON", help="time serial vs overlapped")
    args = parser.parse_args()

    devices = [0, 1]
    if cupy.cuda.runtime.getDeviceCount() < 2:
        raise SystemExit("needs two GPUs")
    enable_peer_access(devices)
    with ExitStack() as stack:
        gpus = [Gpu(device, args, stack) for device in devices]
        # A high-priority compute lease: the GPU's block scheduler then starts the
        # products' blocks before the add kernel's, which waits for free SMs.
        computes = [
            stack.enter_context(
                gpu.pool.acquire_high_priority()
                if args.compute_priority == "high"
                else gpu.pool.acquire_compute()
            )
            for gpu in gpus
        ]
        comms = [stack.enter_context(gpu.pool.acquire_comm()) for gpu in gpus]
        if args.check:
            check(gpus, computes, comms)
        if args.bench:
            figures = bench(gpus, computes, comms, args.repeats)
            report = {
                "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                "gpus": len(devices),
                "buckets": args.buckets,
                "bucket_mib": args.bucket_mib,
                "matmuls_per_bucket": args.matmuls,
                "matmul_size": args.size,
                "add_blocks": args.add_blocks,
                "compute_priority": args.compute_priority,
                **figures,
            }
            with open(args.bench, "w") as f:
                json.dump(report, f, indent=2)
            print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
