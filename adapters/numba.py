"""Numba adapter: a lease as a Numba stream, for kernel launches.

::

    from cupystreams.adapters.numba import as_numba_stream

    with pool.acquire_compute() as lease:
        kernel[blocks, threads, as_numba_stream(lease)](x, y)

The kernel runs on the lease's stream, so it is ordered after the lease's
earlier work (CuPy's included) and before its later work. The Numba stream
wraps the lease's stream without owning it; it is built with
``numba.cuda.external_stream`` once per pooled stream and cached for the
pool's life. Launch on the lease's device (entering the lease makes it
current).

A CuPy array passed straight to a Numba kernel exports CuPy's current stream
in ``__cuda_array_interface__``, and Numba then blocks the host until that
stream is idle. That is safe but stalls the launch; since the kernel runs on
the lease anyway, pass ``numba.cuda.as_cuda_array(x, sync=False)`` to keep the
launch asynchronous.

Stream arguments are anything the core accepts (a lease, a ``PooledStream``, a
``cupy.cuda.Stream``, ``__cuda_stream__``, a raw pointer).
"""

from __future__ import annotations

from typing import Any

try:
    from numba import cuda as numba_cuda
except ImportError as exc:
    raise ImportError(
        "cupystreams.adapters.numba needs Numba's CUDA target, which is not installed; "
        "install it with `pip install cupystreams[numba]`"
    ) from exc

from ._streams import StreamCache, device_of, stream_handle

__all__ = ["as_numba_stream"]


def _external(handle: Any) -> Any:
    # Numba wants its context of the stream's device current while wrapping.
    with numba_cuda.gpus[device_of(handle)]:
        return numba_cuda.external_stream(int(handle.ptr))


_cache: StreamCache[Any] = StreamCache(_external)


def as_numba_stream(stream: object) -> Any:
    """The Numba stream for ``stream`` (a lease or any stream argument).

    Use it as the stream of a launch, ``kernel[blocks, threads, s](...)``, or
    with Numba's copies (``to_device(..., stream=s)``).

    Raises:
        TypeError: Not a stream, or a lease of a pool on the host backend.
        LeaseError, PoolClosedError: A released lease or a closed pool.
    """
    handle, long_lived = stream_handle(stream, "stream")
    return _cache.get(handle, long_lived)
