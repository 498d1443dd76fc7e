"""CuPy's NCCL bindings on comm leases, one process driving every GPU of the host.

    NCCL_NVLS_ENABLE=0 python examples/cupy_nccl_overlap.py --check

Each GPU has its own pool. For every bucket of "gradients", each GPU computes on
a compute lease, records the end of the bucket, and its comm lease waits on the
device and all-reduces the bucket with ``ncclAllReduce`` *on the comm lease's
stream* (CuPy's bindings take a raw stream pointer), while the compute lease
goes on with the next bucket. A ``groupStart``/``groupEnd`` pair issues one
collective for all GPUs from one thread.
"""

from __future__ import annotations

import argparse
import os
from contextlib import ExitStack

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast can take shared GPUs down

import cupy
from cupy.cuda import nccl

from cupystreams import CudaStreamPool


def all_reduce_overlapped(buckets: int, elements: int, matmuls: int) -> list[list[cupy.ndarray]]:
    """Produce and all-reduce ``buckets`` buckets per GPU; return the reduced buckets."""
    devices = list(range(cupy.cuda.runtime.getDeviceCount()))
    comms = nccl.NcclCommunicator.initAll(devices)
    with ExitStack() as stack:
        pools = [stack.enter_context(CudaStreamPool(1, 1, 0, device=d)) for d in devices]
        computes = [stack.enter_context(p.acquire_compute()) for p in pools]
        comms_leases = [stack.enter_context(p.acquire_comm()) for p in pools]
        grads: list[list[cupy.ndarray]] = []
        weights: list[cupy.ndarray] = []
        for device in devices:
            with cupy.cuda.Device(device):
                grads.append([cupy.zeros(elements, cupy.float32) for _ in range(buckets)])
                weights.append(cupy.random.rand(2048, 2048, dtype=cupy.float32))
            cupy.cuda.Device(device).synchronize()
        for bucket in range(buckets):
            for device, compute in zip(devices, computes, strict=True):
                with cupy.cuda.Device(device), compute.cupy_stream:
                    # The compute stand-in: milliseconds of matrix products, then
                    # a value every rank can predict — so a reduce that did not
                    # wait would sum zeros.
                    product = weights[device]
                    for _ in range(matmuls):
                        product = product @ weights[device]
                    grads[device][bucket].fill(float(device + 1 + bucket))
            for compute, comm in zip(computes, comms_leases, strict=True):
                comm.wait(compute)  # bucket complete before it is reduced
            nccl.groupStart()
            for device, comm in zip(devices, comms_leases, strict=True):
                with cupy.cuda.Device(device):
                    buffer = grads[device][bucket]
                    comms[device].allReduce(
                        buffer.data.ptr, buffer.data.ptr, buffer.size,
                        nccl.NCCL_FLOAT32, nccl.NCCL_SUM, comm.ptr,
                    )  # fmt: skip
            nccl.groupEnd()
        for comm in comms_leases:
            comm.synchronize()
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--matmuls", type=int, default=8)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    grads = all_reduce_overlapped(args.buckets, args.elements, args.matmuls)
    world = len(grads)
    if args.check:
        for device, buckets in enumerate(grads):
            for bucket, grad in enumerate(buckets):
                expected = sum(rank + 1 + bucket for rank in range(world))
                with cupy.cuda.Device(device):
                    assert float(grad.min()) == float(grad.max()) == expected, (device, bucket)
        print(f"check passed: {args.buckets} buckets all-reduced over {world} GPUs")


if __name__ == "__main__":
    main()
