"""The work the benchmarks and the demo run: real kernels, or their host stand-ins.

GPU kernels are compiled on first use (CuPy caches them on disk). On the host
backend the same arithmetic runs in numpy, so results can be checked; how long
a kernel would keep the device busy is the device model's business.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["SPIN_SOURCE", "cycles_per_us", "gpu_spin_kernel", "transform"]

#: Per element: ``iterations`` multiply-adds, so compute time is tunable.
_TRANSFORM_BODY = "float t = x; for (int i = 0; i < n; ++i) { t = t * 0.999f + 0.25f; } y = t;"

#: Each thread spins until ``cycles`` clock ticks have passed: a kernel whose
#: blocks occupy the SMs for a known time, to saturate the device.
SPIN_SOURCE = r"""
extern "C" __global__ void cupystreams_spin(long long cycles, int* sink) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    if (sink != nullptr && threadIdx.x == 0) { sink[blockIdx.x] = 1; }
}
"""


@functools.cache
def _transform_kernel() -> Any:
    import cupy

    return cupy.ElementwiseKernel(
        "float32 x, int32 n", "float32 y", _TRANSFORM_BODY, "cupystreams_transform"
    )


@functools.cache
def cycles_per_us(device: int) -> float:
    """SM clock cycles per µs of ``device`` (2 GHz where the driver does not say)."""
    import cupy

    runtime = cupy.cuda.runtime
    try:
        khz = int(runtime.deviceGetAttribute(runtime.cudaDevAttrClockRate, device))
    except Exception:  # CUDA 13 may no longer report the clock rate
        khz = 0
    return (khz if khz > 0 else 2_000_000) / 1e3


@functools.cache
def gpu_spin_kernel() -> Any:
    import cupy

    return cupy.RawKernel(SPIN_SOURCE, "cupystreams_spin")


def transform(backend: str, iterations: int) -> Callable[[Any], Any]:
    """The pipeline's compute: ``iterations`` multiply-adds per element.

    On the cupy backend a CuPy kernel on the current stream, writing a new
    array. On the host backend the same arithmetic in numpy, in place
    (float32 either way; the GPU may fuse each step into one FMA, so the
    backends can differ in the last bit).
    """
    if backend == "cupy":
        kernel = _transform_kernel()

        def on_gpu(x: Any) -> Any:
            return kernel(x, np.int32(iterations))

        return on_gpu

    def on_host(x: np.ndarray) -> np.ndarray:
        # In place: the chunk's buffer is the pipeline's to reuse, and a fresh
        # array per chunk would time the host's page faults, not the pipeline.
        for _ in range(iterations):
            x *= np.float32(0.999)
            x += np.float32(0.25)
        return x

    return on_host
