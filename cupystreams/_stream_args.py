"""One notion of "a stream" in arguments (DESIGN semantic 0)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._stream import PooledStream

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["ACCEPTED_STREAMS", "resolve_stream"]

ACCEPTED_STREAMS = (
    "a StreamLease, a PooledStream, a cupy.cuda.Stream, an object with "
    "__cuda_stream__, or a raw stream pointer int (0 is the legacy default stream)"
)


def resolve_stream(backend: Backend, obj: object, argument: str) -> Any:
    """Return the backend handle for ``obj``, or raise ``TypeError``.

    ``argument`` names the caller's parameter in the error message.
    """
    from ._lease import StreamLease  # the lease module imports this one

    if isinstance(obj, StreamLease):
        return obj._live()._handle
    if isinstance(obj, PooledStream):
        obj._check_open()
        return obj._handle
    if isinstance(obj, bool):
        raise TypeError(f"{argument}={obj!r} is not a stream; pass {ACCEPTED_STREAMS}")
    if isinstance(obj, int) and obj < 0:
        raise ValueError(f"{argument}={obj} is not a valid stream pointer (negative)")
    try:
        return backend.as_stream(obj)
    except TypeError as exc:
        raise TypeError(
            f"{argument}={obj!r} is not usable as a stream: {exc}; pass {ACCEPTED_STREAMS}"
        ) from None
