"""One kernel launch that gathers several device buffers into one.

A pipeline copies small chunks to and from the host in groups, and gathers
the results of a group's chunks into one device buffer for one copy back.
One ``cudaMemcpyAsync`` per result costs the host 5-8 µs, about as much as
the chunk's own kernels; this kernel copies up to ``MAX_SOURCES`` results
of one size in a single launch. Each block row (``blockIdx.y``) copies one
source, in the widest word (16, 8, 4, 2 or 1 bytes) that every address and
the size allow.

The kernels are compiled by CuPy on first use (and cached on disk by
CuPy); ``load`` does it ahead of a CUDA graph capture, during which no
module may be loaded.

Locking: ``_lock`` serializes the one compilation, which sets ``_kernels``
once; readers take the reference without it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_SOURCES", "gather", "load"]

#: Sources one launch copies; a longer list takes several launches.
MAX_SOURCES = 16
_THREADS = 256
_MAX_BLOCKS_PER_SOURCE = 256  # a grid-stride loop covers the rest

_SOURCES = ", ".join(f"unsigned long long s{i}" for i in range(MAX_SOURCES))
_TABLE = ", ".join(f"s{i}" for i in range(MAX_SOURCES))
_CODE = r"""
struct alignas(16) word16 { unsigned long long a, b; };
#define GATHER(NAME, T)                                                              \
extern "C" __global__ void NAME(unsigned long long dst, unsigned long long stride,   \
                                unsigned long long words, int count, SOURCES) {      \
    const unsigned long long sources[] = {TABLE};                                    \
    int k = blockIdx.y;                                                              \
    if (k >= count) return;                                                          \
    const T* from = reinterpret_cast<const T*>(sources[k]);                          \
    T* to = reinterpret_cast<T*>(dst + k * stride);                                  \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; \
         i < words; i += (unsigned long long)gridDim.x * blockDim.x) {               \
        to[i] = from[i];                                                             \
    }                                                                                \
}
GATHER(cupystreams_gather_16, word16)
GATHER(cupystreams_gather_8, unsigned long long)
GATHER(cupystreams_gather_4, unsigned int)
GATHER(cupystreams_gather_2, unsigned short)
GATHER(cupystreams_gather_1, unsigned char)
""".replace("SOURCES", _SOURCES).replace("TABLE", _TABLE)
_WORDS = (16, 8, 4, 2, 1)

_lock = threading.Lock()
# Word size -> cupy.RawKernel (which loads itself on each device it runs on);
# None until the first load. Replaced whole, never changed in place.
_kernels: dict[int, Any] | None = None


def load() -> dict[int, Any]:
    """Compile the kernels, and load them on the current device, now.

    A pipeline calls this before a CUDA graph capture, during which no
    module may be loaded; otherwise the first ``gather`` does it.
    """
    global _kernels
    kernels = _kernels
    if kernels is None:
        import cupy

        with _lock:
            if _kernels is None:
                module = cupy.RawModule(code=_CODE, options=("--std=c++17",))
                _kernels = {w: module.get_function(f"cupystreams_gather_{w}") for w in _WORDS}
            kernels = _kernels
    for kernel in kernels.values():
        kernel.kernel  # noqa: B018 -- loads the module on the current device
    return kernels


def gather(dst: int, stride: int, sources: Sequence[int], nbytes: int, stream: Any) -> None:
    """Queue on ``stream``: copy ``nbytes`` from each ``sources[k]`` to ``dst + k * stride``.

    Addresses are device pointers of the current device; the copies must not
    overlap.
    """
    kernels = _kernels if _kernels is not None else load()
    # The widest word that every address, the stride and the size are multiples of.
    alignment = math.gcd(dst, stride, nbytes, *sources)
    word = next(w for w in _WORDS if alignment % w == 0)
    launch = kernels[word].kernel  # the current device's function
    words = nbytes // word
    blocks = min(_MAX_BLOCKS_PER_SOURCE, -(-words // _THREADS))
    for first in range(0, len(sources), MAX_SOURCES):
        batch = sources[first : first + MAX_SOURCES]
        args = [np.uint64(dst + first * stride), np.uint64(stride), np.uint64(words)]
        args.append(np.int32(len(batch)))
        args += [np.uint64(source) for source in batch]
        args += _PADDING[len(batch) :]
        launch((blocks, len(batch)), (_THREADS,), args, stream=stream)


_PADDING = [np.uint64(0)] * MAX_SOURCES
