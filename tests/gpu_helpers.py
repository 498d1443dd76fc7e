"""GPU test helpers: a deliberately slow producer and views that never synchronize.

A race test proves an ordering by making it matter: the producer spins on
``clock64()`` for ``SPIN_MS`` before it writes, so a consumer that is not
ordered after it reads the old contents and the test fails. Consumers read
through ``raw_view`` (a CuPy array over unowned memory) or ``RawCudaArray``
(a ``__cuda_array_interface__`` without a stream), so no framework
synchronizes on the consumer's behalf.

Run every consumer once before the race starts: CUDA loads a kernel on its
first launch (lazy loading), and loading may synchronize the whole device,
which would order the race by accident and hide a missing wait.

Importing this module touches neither CuPy nor the GPU; the kernel is
compiled on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

SPIN_MS = 50
_THREADS = 256
_MAX_BLOCKS = 512  # few enough to be resident at once: every thread spins once, together

_SOURCE = r"""
extern "C" __global__ void slow_write(float* dst, const float* src, float value,
                                      long long n, long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = src != nullptr ? src[i] : value;
    }
}
"""


@functools.cache
def _kernel() -> Any:
    import cupy

    return cupy.RawKernel(_SOURCE, "slow_write")


@functools.cache
def _cycles_per_ms(device: int) -> int:
    import cupy

    runtime = cupy.cuda.runtime
    try:
        khz = int(runtime.deviceGetAttribute(runtime.cudaDevAttrClockRate, device))
    except runtime.CUDARuntimeError:
        khz = 0
    # kHz is cycles per millisecond; 2 GHz where the driver does not say.
    return khz if khz > 0 else 2_000_000


def as_cupy_stream(stream: object) -> Any:
    """A CuPy stream for a CuPy stream, a ``__cuda_stream__`` object or a raw pointer."""
    from cupystreams._backends._cupy import foreign_stream

    return foreign_stream(stream)


def _launch(stream: object, dst: int, src: int, value: float, n: int, ms: float) -> None:
    import cupy
    import numpy as np

    device = cupy.cuda.runtime.getDevice()
    cycles = int(ms * _cycles_per_ms(device))
    blocks = min(_MAX_BLOCKS, max(1, -(-n // _THREADS)))
    with as_cupy_stream(stream):
        _kernel()(
            (blocks,),
            (_THREADS,),
            (np.uint64(dst), np.uint64(src), np.float32(value), np.int64(n), np.int64(cycles)),
        )


def spin(stream: object, ms: float = SPIN_MS) -> None:
    """Queue ``ms`` milliseconds of busy GPU time on ``stream``, writing nothing."""
    _launch(stream, 0, 0, 0.0, 0, ms)


def slow_fill(ptr: int, n: int, value: float, stream: object, ms: float = SPIN_MS) -> None:
    """On ``stream``: spin ``ms`` ms, then write ``value`` to ``n`` float32s at ``ptr``."""
    _launch(stream, ptr, 0, value, n, ms)


def slow_copy(src: int, dst: int, n: int, stream: object, ms: float = SPIN_MS) -> None:
    """On ``stream``: spin ``ms`` milliseconds, then copy ``n`` float32s from ``src`` to ``dst``."""
    _launch(stream, dst, src, 0.0, n, ms)


def raw_view(ptr: int, n: int, owner: object = None) -> Any:
    """A float32 CuPy array over ``n`` elements at ``ptr``, knowing nothing of streams."""
    import cupy

    memory = cupy.cuda.UnownedMemory(ptr, n * 4, owner)
    return cupy.ndarray((n,), cupy.float32, cupy.cuda.MemoryPointer(memory, 0))


class RawCudaArray:
    """``__cuda_array_interface__`` for ``n`` float32s at ``ptr``, with no stream.

    Without a ``stream`` entry, neither torch nor Numba synchronizes anything
    when it imports the array.
    """

    def __init__(self, ptr: int, n: int, owner: object = None) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (n,),
            "typestr": "<f4",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }


def gpu_and(module: str) -> Callable[[F], F]:
    """Mark a test as needing a GPU and ``module`` (see conftest for both markers)."""

    def mark(test: F) -> F:
        marked: F = pytest.mark.gpu(pytest.mark.requires_module(module)(test))
        return marked

    return mark
