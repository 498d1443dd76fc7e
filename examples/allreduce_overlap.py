"""All-reduce gradient buckets on a comm lease while compute continues on a compute lease.

One process per GPU, launched on one host with torchrun::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 examples/allreduce_overlap.py --check
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 examples/allreduce_overlap.py --bench out.json

The compute stand-in is a data-parallel backward pass: bucket after bucket of
"gradients" comes out of bf16 matrix products on a compute lease. As soon as a
bucket is ready, the compute lease records an event, the comm lease waits for
it on the device, and ``torch.distributed.all_reduce`` runs with the comm
lease as torch's current stream — torch's NCCL stream is ordered after the comm
lease, and the comm lease after the collective — while the compute lease goes
on with the next bucket. Nothing blocks the host until the step ends.

``--bench`` times, per rank, compute alone, communication alone, both serially
on one stream, both overlapped through the pool, and the same overlap on two
streams made by torch (the hand-written peer), and reports each as a fraction
of the bound max(compute, communication).

Two knobs decide how close overlap gets to that bound, because the collective's
kernels and the matrix products share the SMs: ``--nccl-high-priority`` puts
torch's NCCL stream at the device's greatest priority (so the collective's
blocks are scheduled first as SMs free up), and ``NCCL_MAX_CTAS`` in the
environment caps how many SMs a collective may hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

# NVLink multicast stays off: it can take a shared host's GPUs out of service.
os.environ["NCCL_NVLS_ENABLE"] = "0"

import cupy
import torch
import torch.distributed as dist

from cupystreams import CudaStreamPool, StreamLease
from cupystreams.adapters.torch import as_torch_stream


class Step:
    """One training step's worth of buckets on this rank's GPU."""

    def __init__(self, buckets: int, bucket_mib: int, matmuls: int, size: int) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        elements = bucket_mib * (1 << 20) // 4
        self.grads = [torch.empty(elements, device=device) for _ in range(buckets)]
        self.a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        self.matmuls = matmuls

    def compute(self, bucket: int) -> None:
        """The backward work that produces ``grads[bucket]`` (on torch's current stream)."""
        out = self.a
        for _ in range(self.matmuls):
            out = out @ self.b
        self.grads[bucket].fill_(float(dist.get_rank() + 1 + bucket))
        del out

    def communicate(self, bucket: int) -> None:
        dist.all_reduce(self.grads[bucket])


def run_serial(step: Step, lease: StreamLease) -> None:
    with torch.cuda.stream(as_torch_stream(lease)):
        for i in range(len(step.grads)):
            step.compute(i)
            step.communicate(i)


def run_overlapped(step: Step, compute: StreamLease, comm: StreamLease) -> None:
    compute_stream, comm_stream = as_torch_stream(compute), as_torch_stream(comm)
    for i in range(len(step.grads)):
        with torch.cuda.stream(compute_stream):
            step.compute(i)
        comm.wait(compute)  # on the device: bucket i is complete before it is reduced
        with torch.cuda.stream(comm_stream):
            step.communicate(i)
    compute.wait(comm)  # the step ends when both are done


def run_overlapped_by_hand(step: Step, compute: torch.cuda.Stream, comm: torch.cuda.Stream) -> None:
    """The same schedule on two streams torch made: the peer the pool is measured against."""
    for i in range(len(step.grads)):
        with torch.cuda.stream(compute):
            step.compute(i)
        comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            step.communicate(i)
    compute.wait_stream(comm)


def time_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn`` in ms, every rank in step, after two warm-ups."""
    samples = []
    for i in range(repeats + 2):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()  # every stream of this GPU, pooled ones included
        if i >= 2:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def check(pool: CudaStreamPool, step: Step) -> None:
    world = dist.get_world_size()
    with pool.acquire_compute() as compute, pool.acquire_comm() as comm:
        run_overlapped(step, compute, comm)
        compute.synchronize()
    for i, grad in enumerate(step.grads):
        expected = sum(rank + 1 + i for rank in range(world))
        got = grad[:: max(1, grad.numel() // 1024)]
        assert bool((got == expected).all()), f"bucket {i}: {got[:4].tolist()} != {expected}"
    if dist.get_rank() == 0:
        print(f"check passed: {len(step.grads)} buckets all-reduced over {world} GPUs")


def bench(pool: CudaStreamPool, step: Step, repeats: int) -> dict[str, Any]:
    buckets = range(len(step.grads))
    by_hand_streams = (torch.cuda.Stream(), torch.cuda.Stream())
    with pool.acquire_compute() as compute, pool.acquire_comm() as comm:
        compute_stream = as_torch_stream(compute)

        def compute_only() -> None:
            with torch.cuda.stream(compute_stream):
                for i in buckets:
                    step.compute(i)

        def comm_only() -> None:
            with torch.cuda.stream(as_torch_stream(comm)):
                for i in buckets:
                    step.communicate(i)

        figures = {
            "compute_ms": time_ms(compute_only, repeats),
            "comm_ms": time_ms(comm_only, repeats),
            "serial_ms": time_ms(lambda: run_serial(step, compute), repeats),
            "overlapped_ms": time_ms(lambda: run_overlapped(step, compute, comm), repeats),
            "by_hand_ms": time_ms(lambda: run_overlapped_by_hand(step, *by_hand_streams), repeats),
        }
    bound = max(figures["compute_ms"], figures["comm_ms"])
    figures["bound_ms"] = bound
    figures["overlapped_vs_bound"] = bound / figures["overlapped_ms"]
    figures["serial_vs_bound"] = bound / figures["serial_ms"]
    figures["by_hand_vs_bound"] = bound / figures["by_hand_ms"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--matmuls", type=int, default=2)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="verify the reduced values")
    parser.add_argument("--bench", metavar="JSON", help="time serial vs overlapped")
    parser.add_argument(
        "--nccl-high-priority",
        action="store_true",
        help="run torch's NCCL stream at the device's greatest priority",
    )
    args = parser.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    cupy.cuda.Device(local_rank).use()
    # The collective runs on torch's own NCCL stream (ordered after the comm
    # lease), so its priority is torch's option, not the lease's.
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=args.nccl_high_priority)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), pg_options=options)
    try:
        with CudaStreamPool(compute_streams=2, comm_streams=1, device=local_rank) as pool:
            step = Step(args.buckets, args.bucket_mib, args.matmuls, args.size)
            if args.check:
                check(pool, step)
            if args.bench:
                figures = bench(pool, step, args.repeats)
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, figures)
                if dist.get_rank() == 0:
                    report = {
                        "device": torch.cuda.get_device_name(),
                        "world_size": dist.get_world_size(),
                        "buckets": args.buckets,
                        "bucket_mib": args.bucket_mib,
                        "matmuls_per_bucket": args.matmuls,
                        "matmul_size": args.size,
                        "nccl_high_priority": args.nccl_high_priority,
                        "nccl_max_ctas": os.environ.get("NCCL_MAX_CTAS"),
                        "per_rank": gathered,
                    }
                    with open(args.bench, "w") as f:
                        json.dump(report, f, indent=2)
                    print(json.dumps(report, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
