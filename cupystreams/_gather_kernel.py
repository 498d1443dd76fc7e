"""One kernel launch that gathers several device buffers into one.

A pipeline copies small chunks to and from the host in groups, and gathers
the results of a group's chunks into one device buffer for one copy back.
One ``cudaMemcpyAsync`` per result costs the host 5-8 µs, about as much as
the chunk's own kernels; this kernel copies up to ``MAX_SOURCES`` results
of one size in a single launch. Each block row (``blockIdx.y``) copies one
source, in the widest word (16, 8, 4, 2 or 1 bytes) that every address and
the size allow.

The kernels are compiled by CuPy the first time a device needs them (and
cached on disk by CuPy), and loaded once per device: ``ready`` does both,
also ahead of a CUDA graph capture, during which no module may be loaded.
Where CuPy cannot compile them (no NVRTC), ``ready`` says so once and for
all, and callers copy one result at a time, as before the kernel existed.

Locking: ``_lock`` serializes compiling and loading, and guards the writes
of ``_kernels``, ``_loaded`` and ``_failed``; each is replaced whole, so the
fast path of ``ready`` reads them without it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_SOURCES", "batch_length", "gather", "ready"]

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

_PADDING = [np.uint64(0)] * MAX_SOURCES

_lock = threading.Lock()
_kernels: dict[int, Any] | None = None  # word size -> cupy.RawKernel, once compiled
_loaded: frozenset[int] = frozenset()  # devices the module is loaded on
_failed: str | None = None  # why the kernels cannot be compiled, once that is known


def ready(device: int) -> bool:
    """Whether ``gather`` can run on ``device``, the current device.

    Compiles the kernels and loads them on the device the first time (in a
    CUDA graph capture, call it before the capture begins). False, and never
    tried again, when CuPy cannot compile or load them.
    """
    global _kernels, _loaded, _failed
    if device in _loaded:
        return True
    if _failed is not None:
        return False
    with _lock:  # one thread compiles and loads; CuPy's per-device caches are not locked
        if device in _loaded or _failed is not None:
            return _failed is None
        try:
            import cupy

            kernels = _kernels
            if kernels is None:
                module = cupy.RawModule(code=_CODE, options=("--std=c++17",))
                kernels = {w: module.get_function(f"cupystreams_gather_{w}") for w in _WORDS}
            for kernel in kernels.values():
                kernel.kernel  # noqa: B018 -- loads the module on the current device
        except Exception as exc:  # no NVRTC, or a driver that refuses the module
            _failed = f"{type(exc).__name__}: {exc}"
            return False
        _kernels = kernels
        _loaded = _loaded | {device}
    return True


def batch_length(sizes: Sequence[int], starts: Sequence[int], devices: Sequence[int]) -> int:
    """How many of the leading results one launch can gather.

    Those of the first result's size, at evenly spaced destination
    ``starts``, on the first result's device; the kernel needs at least two
    to be worth its launch, so callers copy the rest one at a time.
    """
    count = len(sizes)
    spacing = starts[1] - starts[0] if count > 1 else 0
    length = 1 if count else 0
    while (
        length < count
        and sizes[length] == sizes[0]
        and devices[length] == devices[0]
        and starts[length] - starts[0] == length * spacing
    ):
        length += 1
    return length


def gather(dst: int, stride: int, sources: Sequence[int], nbytes: int, stream: Any) -> None:
    """Queue on ``stream``: copy ``nbytes`` from each ``sources[k]`` to ``dst + k * stride``.

    Addresses are device pointers of the current device, for which
    ``ready`` returned True; the copies must not overlap.
    """
    kernels = _kernels
    assert kernels is not None, "gather() before ready()"
    if nbytes == 0:
        return  # rows of no bytes: nothing to copy, and no empty grid to launch
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
