"""JAX adapter: hand arrays between JAX and a lease, in stream order.

JAX cannot run computations on a foreign stream. XLA launches every kernel on
streams it creates and owns, and there is no API to run a jitted function on a
stream you pass in, so there is no ``use(lease)`` for JAX and a lease cannot
make JAX code run on it. What to do instead: run JAX code as usual, on JAX's
streams, and order the hand-offs:

* ``from_jax(array, lease)`` gives the JAX array to CuPy work on the lease.
  The lease's stream is passed to JAX through DLPack, so JAX makes the lease
  wait, on the GPU, for the computation that produces the array; the host
  does not block.
* ``to_jax(array, lease)`` gives a CuPy array produced on the lease to JAX.
  JAX asks for the hand-off on its own stream, and that stream waits, on the
  GPU, for the work queued on the lease so far.

Both share memory (no copy). Lifetimes are the caller's: keep the array
alive until the other side's work on it has finished (``lease.synchronize()``,
or ``block_until_ready()`` on JAX's results), because neither JAX's nor CuPy's
allocator knows about the other side's pending work. JAX arrays are immutable:
do not write into the view ``from_jax`` returns.

Stream arguments are anything the core accepts (a lease, a ``PooledStream``, a
``cupy.cuda.Stream``, ``__cuda_stream__``, a raw pointer).
"""

from __future__ import annotations

from typing import Any

try:
    import jax
    import jax.dlpack
except ImportError as exc:
    raise ImportError(
        "cupystreams.adapters.jax needs JAX, which is not installed; "
        "install it with `pip install cupystreams[jax]` (and a CUDA jaxlib, e.g. jax[cuda13])"
    ) from exc

import cupy

from ._streams import CupyCurrent, device_of, stream_handle

__all__ = ["from_jax", "to_jax"]


def _check_device(array_device: int, stream_device: int, stream: object) -> None:
    if array_device != stream_device:
        raise ValueError(
            f"the array is on device {array_device} but stream={stream!r} is on device "
            f"{stream_device}; hand arrays over on a lease of the array's device"
        )


def from_jax(array: Any, stream: object) -> Any:
    """A zero-copy ``cupy.ndarray`` view of a JAX array, safe to use on ``stream``.

    The lease's stream waits, on the GPU, for the JAX computation that
    produces ``array``; this call does not wait for it on the host. Work on
    other streams must not read the view before ordering itself after the
    lease (``other.wait(lease)``).

    Args:
        array: A ``jax.Array`` on one GPU.
        stream: The lease (or any stream argument) that will use the view.

    Raises:
        TypeError: ``array`` is not a JAX array.
        ValueError: ``array`` is on another device than ``stream``.
    """
    if not isinstance(array, jax.Array):
        raise TypeError(f"array={type(array).__name__} is not a jax.Array")
    handle, _ = stream_handle(stream, "stream")
    device = device_of(handle)
    _check_device(int(array.__dlpack_device__()[1]), device, stream)
    # CuPy hands its current stream to JAX's __dlpack__, which makes that
    # stream wait for the array: so the lease must be CuPy's current stream.
    with CupyCurrent(handle):
        return cupy.from_dlpack(array)


def to_jax(array: Any, stream: object) -> Any:
    """A zero-copy ``jax.Array`` of a CuPy array, ordered after ``stream``'s work so far.

    JAX's stream waits, on the GPU, for everything queued on the lease before
    this call, so JAX code may use the result at once; the host does not
    block. Work queued on the lease after this call is not ordered before JAX.

    Args:
        array: A ``cupy.ndarray`` produced on the lease.
        stream: The lease (or any stream argument) that produced it.

    Raises:
        TypeError: ``array`` is not a ``cupy.ndarray``. (Another framework's
            ``__dlpack__`` would order against that framework's current
            stream, not the lease.)
        ValueError: ``array`` is on another device than ``stream``.
    """
    if not isinstance(array, cupy.ndarray):
        raise TypeError(
            f"array={type(array).__name__} is not a cupy.ndarray; convert it on the lease "
            "first (cupy.from_dlpack), since only CuPy's export orders against the lease"
        )
    handle, _ = stream_handle(stream, "stream")
    device = device_of(handle)
    _check_device(int(array.data.device_id), device, stream)
    # CuPy's __dlpack__ makes the consumer's (JAX's) stream wait for CuPy's
    # current stream: so the lease must be current while JAX imports.
    with CupyCurrent(handle):
        return jax.dlpack.from_dlpack(array)
