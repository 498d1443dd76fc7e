"""One notion of "a stream" in arguments, shared by every call that takes one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._stream import PooledStream

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["ACCEPTED_STREAMS", "check_pointer", "foreign_handle", "pooled_source", "resolve_stream"]

ACCEPTED_STREAMS = (
    "a StreamLease, a PooledStream, a cupy.cuda.Stream, an object with "
    "__cuda_stream__, or a raw stream pointer int (0 is the legacy default stream)"
)


def pooled_source(obj: object) -> PooledStream | None:
    """The live pooled stream behind a lease or pooled stream, else None."""
    from ._lease import StreamLease  # the lease module imports this one

    if isinstance(obj, StreamLease):
        return obj._live()
    if isinstance(obj, PooledStream):
        obj._check_open()
        return obj
    return None


def check_pointer(obj: object, argument: str) -> None:
    """A raw pointer int must fit a ``cudaStream_t``; other objects pass through."""
    if isinstance(obj, int) and not isinstance(obj, bool) and not 0 <= obj < 1 << 64:
        raise ValueError(
            f"{argument}={obj} is not a valid stream pointer (outside [0, 2**64)); "
            "pass lease.ptr or an object with __cuda_stream__"
        )


def foreign_handle(convert: Callable[[object], Any], obj: object, argument: str) -> Any:
    """``convert(obj)`` for a stream the pool does not own, with the errors the API promises."""
    if isinstance(obj, bool):
        raise TypeError(f"{argument}={obj!r} is not a stream; pass {ACCEPTED_STREAMS}")
    check_pointer(obj, argument)
    try:
        return convert(obj)
    except TypeError as exc:
        raise TypeError(
            f"{argument}={obj!r} is not usable as a stream: {exc}; pass {ACCEPTED_STREAMS}"
        ) from None


def resolve_stream(backend: Backend, obj: object, argument: str) -> Any:
    """Return ``backend``'s handle for ``obj``, or raise ``TypeError``.

    A stream of another device is a ``ValueError``: CUDA cannot record an
    event of one device on a stream of another. ``argument`` names the
    caller's parameter in the error message.
    """
    pooled = pooled_source(obj)
    device = pooled._backend.device if pooled is not None else getattr(obj, "device_id", None)
    # CuPy says -1 for streams of no particular device (Stream.null, from_external).
    if isinstance(device, int) and device >= 0 and device != backend.device:
        raise ValueError(
            f"{argument}={obj!r} is a stream of device {device}, but this call works on "
            f"device {backend.device}; use a lease or event pool of device {device}"
        )
    if pooled is not None:
        return pooled._open_handle()
    return foreign_handle(backend.as_stream, obj, argument)
