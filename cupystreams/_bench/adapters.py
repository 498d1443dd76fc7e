"""What each framework adapter costs per use, next to the plain framework calls.

Each row times one adapter call and the framework call a user would write
without the adapter, in the same process on the same lease. Frameworks that
are not installed are left out. Needs the cupy backend (a GPU). The adapters
and frameworks are imported only when this runs (by name: ``adapters/`` is
installed as ``cupystreams.adapters``, which type checkers cannot map).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from .. import CudaStreamPool, StreamLease
from .common import interleaved_us_per_op

__all__ = ["run_adapter_benchmarks"]

Row = dict[str, object]
_CHEAP = 2_000  # operations per batch for calls of a few µs
_COSTLY = 200  # for DLPack hand-offs


def _loop(call: Callable[[], object]) -> Callable[[int], None]:
    def batch(n: int) -> None:
        for _ in range(n):
            call()

    return batch


def _row(
    row_id: str,
    name: str,
    call: Callable[[], object],
    baseline: str,
    baseline_call: Callable[[], object],
    number: int,
    repeats: int,
) -> Row:
    # Timed in turn, so the pair shares one machine state.
    us = interleaved_us_per_op(
        {"adapter": (_loop(call), number), "baseline": (_loop(baseline_call), number)}, repeats
    )
    return {
        "id": f"adapters.{row_id}",
        "name": name,
        "median_us": us["adapter"],
        "baseline": baseline,
        "baseline_us": us["baseline"],
    }


def _torch_rows(lease: StreamLease, repeats: int) -> list[Row]:
    import torch

    cst_torch = importlib.import_module("cupystreams.adapters.torch")

    ptr = lease.ptr
    use, stream_context = cst_torch.use, torch.cuda.stream
    external, from_external = torch.cuda.ExternalStream, torch.cuda.get_stream_from_external
    lease_stream = cst_torch.as_torch_stream(lease)
    tensor = torch.zeros(1024, device="cuda")

    def enter_lease() -> None:
        with use(lease):
            pass

    def enter_wrapped() -> None:
        with stream_context(external(ptr)):
            pass

    def enter_prebuilt() -> None:
        with stream_context(lease_stream):
            pass

    def torch_waits() -> None:
        torch.cuda.current_stream().wait_stream(lease_stream)

    def lease_waits() -> None:
        lease_stream.wait_stream(torch.cuda.current_stream())

    rows = [
        _row(
            "torch_use_vs_external_stream",
            "with torch.use(lease)",
            enter_lease,
            "with torch.cuda.stream(torch.cuda.ExternalStream(ptr))",
            enter_wrapped,
            _CHEAP,
            repeats,
        ),
        _row(
            "torch_use_vs_prebuilt_stream",
            "with torch.use(lease)",
            enter_lease,
            "with torch.cuda.stream(prebuilt torch stream)",
            enter_prebuilt,
            _CHEAP,
            repeats,
        ),
        _row(
            "torch_as_torch_stream",
            "torch.as_torch_stream(lease)",
            lambda: cst_torch.as_torch_stream(lease),
            "torch.cuda.get_stream_from_external(ptr)",
            lambda: from_external(ptr),
            _CHEAP,
            repeats,
        ),
        _row(
            "torch_protect",
            "torch.protect(lease, tensor)",
            lambda: cst_torch.protect(lease, tensor),
            "tensor.record_stream(prebuilt torch stream)",
            lambda: tensor.record_stream(lease_stream),
            _CHEAP,
            repeats,
        ),
        _row(
            "torch_waits_for_lease",
            "torch.torch_waits_for_lease(lease)",
            lambda: cst_torch.torch_waits_for_lease(lease),
            "torch.cuda.current_stream().wait_stream(prebuilt)",
            torch_waits,
            _CHEAP,
            repeats,
        ),
        _row(
            "torch_lease_waits_for_torch",
            "torch.lease_waits_for_torch(lease)",
            lambda: cst_torch.lease_waits_for_torch(lease),
            "prebuilt.wait_stream(torch.cuda.current_stream())",
            lease_waits,
            _CHEAP,
            repeats,
        ),
    ]
    torch.cuda.synchronize()
    return rows


def _jax_rows(lease: StreamLease, repeats: int) -> list[Row]:
    import cupy
    import jax
    import jax.dlpack
    import jax.numpy as jnp

    cst_jax = importlib.import_module("cupystreams.adapters.jax")

    jax_array = jnp.ones(1024, dtype=jnp.float32).block_until_ready()
    cupy_array = cupy.ones(1024, dtype=cupy.float32)
    rows = [
        _row(
            "jax_from_jax",
            "jax.from_jax(array, lease)",
            lambda: cst_jax.from_jax(jax_array, lease),
            "cupy.from_dlpack(array)",
            lambda: cupy.from_dlpack(jax_array),
            _COSTLY,
            repeats,
        ),
        _row(
            "jax_to_jax",
            "jax.to_jax(array, lease)",
            lambda: cst_jax.to_jax(cupy_array, lease),
            "jax.dlpack.from_dlpack(array)",
            lambda: jax.dlpack.from_dlpack(cupy_array),
            _COSTLY,
            repeats,
        ),
    ]
    lease.synchronize()
    return rows


def _numba_rows(lease: StreamLease, repeats: int) -> list[Row]:
    from numba import cuda

    cst_numba = importlib.import_module("cupystreams.adapters.numba")

    ptr = lease.ptr
    return [
        _row(
            "numba_as_numba_stream",
            "numba.as_numba_stream(lease)",
            lambda: cst_numba.as_numba_stream(lease),
            "numba.cuda.external_stream(ptr)",
            lambda: cuda.external_stream(ptr),
            _CHEAP,
            repeats,
        )
    ]


_FRAMEWORKS: list[tuple[str, Callable[[StreamLease, int], list[Row]]]] = [
    ("torch", _torch_rows),
    ("jax", _jax_rows),
    ("numba", _numba_rows),
]


def run_adapter_benchmarks(repeats: int) -> list[dict[str, object]]:
    """Time every installed adapter against its plain framework call.

    Args:
        repeats: Batches per figure; each figure is the median over them, in
            µs per call.

    Returns:
        One dict per comparison: ``id`` (stable, for the documents),
        ``name`` and ``median_us`` (the adapter call), ``baseline`` and
        ``baseline_us`` (the framework call it replaces).
    """
    rows: list[Row] = []
    with CudaStreamPool(1, 0, 0, backend="cupy") as pool, pool.acquire_compute() as lease:
        for module, measure in _FRAMEWORKS:
            if importlib.util.find_spec(module) is not None:
                rows.extend(measure(lease, repeats))
        lease.synchronize()
    return rows
