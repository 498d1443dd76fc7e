"""What every adapter shares: stream arguments, a weak per-stream cache, GPU ordering.

Adapters take the same stream arguments as the core (see the manual's semantics): a
``StreamLease``, a ``PooledStream``, a ``cupy.cuda.Stream``, any object with
``__cuda_stream__``, or a raw pointer int (0 is the legacy default stream).
Each is turned into a CuPy stream here, because every hand-off goes through
CuPy's notion of "the current stream".
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

try:
    import cupy
except ImportError as exc:
    raise ImportError(
        "cupystreams adapters need CuPy, which is not installed; install it with "
        "`pip install cupystreams[cuda13]` (or `cupystreams[cuda12]`)"
    ) from exc

from cupystreams import StreamLease
from cupystreams._backends._cupy import (
    CUPY_STREAMS,
    foreign_stream,
    make_current,
    restore_current,
)
from cupystreams._stream_args import foreign_handle, pooled_source

__all__ = ["CupyCurrent", "StreamCache", "device_of", "order", "stream_handle"]

T = TypeVar("T")


def stream_handle(obj: object, argument: str) -> tuple[Any, bool]:
    """Return ``(cupy_stream, long_lived)`` for a stream argument.

    ``long_lived`` is True when the CuPy stream object outlives this call (a
    pool's stream, or a CuPy stream the caller holds), so that values built for
    it may be cached against it. A pointer or a protocol object gets a fresh
    CuPy wrapper on the current device, which is not worth caching.

    Raises:
        TypeError: ``obj`` is no stream, or a lease of a pool on the host backend.
        LeaseError, PoolClosedError: a released lease, or a closed pool's stream.
    """
    # A lease first: it is the common case and the hot path of every adapter.
    pooled = obj._live() if type(obj) is StreamLease else pooled_source(obj)
    if pooled is not None:
        handle = pooled._handle  # already checked open by _live() / pooled_source()
        if not isinstance(handle, CUPY_STREAMS):
            raise TypeError(
                f"{argument}={obj!r} belongs to a pool on the host backend, which has no "
                "CUDA streams; framework adapters need a pool with backend='cupy'"
            )
        return handle, True
    if isinstance(obj, CUPY_STREAMS):
        # Stream.null has no device of its own (device_id -1): not cacheable.
        return obj, obj.device_id >= 0
    return foreign_handle(foreign_stream, obj, argument), False


def device_of(handle: Any) -> int:
    """The device of a CuPy stream (the current device for ``Stream.null``)."""
    device: int = handle.device_id
    return device if device >= 0 else int(cupy.cuda.runtime.getDevice())


class CupyCurrent:
    """``with CupyCurrent(handle):`` makes a CuPy stream and its device current.

    Both are restored on exit. A plain class rather than a generator context
    manager: the hand-offs are hot paths, and this costs a third of one.
    """

    __slots__ = ("_device", "_handle", "_saved")

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._device = device_of(handle)
        self._saved: tuple[int, Any] | None = None

    def __enter__(self) -> None:
        self._saved = make_current(self._device, self._handle)

    def __exit__(self, *exc_info: object) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            restore_current(self._device, saved)


def _dropper(entries: dict[int, tuple[Any, Any]], ident: int) -> Callable[[Any], None]:
    # A factory, so the weakref callback holds the table and the id, never a cache.
    def drop(ref: Any) -> None:
        entry = entries.get(ident)
        if entry is not None and entry[0] is ref:
            del entries[ident]

    return drop


class StreamCache(Generic[T]):
    """Values built once per CuPy stream object and dropped with that object.

    A pool's CuPy streams live as long as the pool's ``PooledStream`` objects,
    so a collected pool takes its entries with it; the cache never keeps a
    stream alive. Entries are keyed by object identity, checked through a weak
    reference, so a new stream at a recycled address never finds a stale
    entry. Thread-safe: racing first uses may both build, one value is kept.
    """

    def __init__(self, build: Callable[[Any], T]) -> None:
        self._build = build
        self._entries: dict[int, tuple[Any, T]] = {}
        self._lock = threading.Lock()

    def peek(self, handle: Any) -> T | None:
        """The cached value for ``handle``, or None."""
        entry = self._entries.get(id(handle))
        if entry is not None and entry[0]() is handle:
            return entry[1]
        return None

    def get(self, handle: Any, long_lived: bool) -> T:
        """The value for ``handle``; built without caching when not ``long_lived``."""
        if not long_lived:
            return self._build(handle)
        ident = id(handle)
        entry = self._entries.get(ident)
        if entry is not None and entry[0]() is handle:
            return entry[1]
        value = self._build(handle)
        with self._lock:
            entry = self._entries.get(ident)
            if entry is not None and entry[0]() is handle:
                return entry[1]
            self._entries[ident] = (weakref.ref(handle, _dropper(self._entries, ident)), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


_local = threading.local()


def _ordering_event(device: int) -> Any:
    # One event per thread and device: CUDA captures an event's state when a
    # stream is told to wait on it, so re-recording it later is safe, and a
    # thread-local event cannot be re-recorded by another thread in between.
    events: dict[int, Any] | None = getattr(_local, "events", None)
    if events is None:
        events = _local.events = {}
    event = events.get(device)
    if event is None:
        with cupy.cuda.Device(device):
            event = events[device] = cupy.cuda.Event(block=False, disable_timing=True)
    return event


def order(waiter: int, producer: int, device: int) -> None:
    """Make stream ``waiter`` wait, on the GPU, for the work queued on ``producer`` so far.

    Both are raw pointers of streams of ``device`` (0: that device's legacy
    default stream). The host never blocks.
    """
    if waiter == producer:
        return  # a stream is already ordered after its own work
    event = _ordering_event(device)
    runtime = cupy.cuda.runtime
    previous = runtime.getDevice()
    if previous != device:
        runtime.setDevice(device)  # pointer 0 means the *current* device's legacy stream
    try:
        runtime.eventRecord(event.ptr, producer)
        runtime.streamWaitEvent(waiter, event.ptr, 0)
    finally:
        if previous != device:
            runtime.setDevice(previous)
