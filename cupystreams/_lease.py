"""StreamLease: the exclusive, one-shot handle on a pooled stream."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import LeaseError
from ._events import PooledEvent
from ._stream_args import resolve_stream
from ._types import StreamState

if TYPE_CHECKING:
    from ._pool import CudaStreamPool
    from ._stream import PooledStream

__all__ = ["StreamLease"]

# Bound early, as CuPy does, so a lease collected at interpreter shutdown does
# not touch half-torn-down modules.
_is_finalizing = sys.is_finalizing


class StreamLease:
    """Exclusive use of one pooled stream until ``release()``.

    Entering the lease (``with``) makes its device and stream current on the
    calling thread, for CuPy and for the pool; leaving restores both and
    releases the lease. After release every method raises ``LeaseError``.
    A lease is meant for one thread at a time; the pool itself is
    thread-safe. A lease dropped without release goes back to the pool when it
    is collected, with a ``ResourceWarning``.
    """

    __slots__ = ("__weakref__", "_key", "_pool", "_slot", "_token")

    _key: Hashable | None
    _pool: CudaStreamPool
    _slot: list[PooledStream]
    _token: tuple[Any] | None

    def __init__(self, *_: object) -> None:
        raise TypeError(
            "StreamLease has no public constructor; use pool.acquire_compute() "
            "or another pool.acquire_*() method"
        )

    @classmethod
    def _create(
        cls, pool: CudaStreamPool, stream: PooledStream, key: Hashable | None
    ) -> StreamLease:
        self = object.__new__(cls)
        self._pool = pool
        # The hold is a one-element list: list.pop() is atomic, so of two racing
        # releases exactly one gets the stream back.
        self._slot = [stream]
        self._key = key
        self._token = None
        return self

    def _live(self) -> PooledStream:
        try:
            stream = self._slot[0]
        except IndexError:
            raise LeaseError("this lease was released; acquire a new one") from None
        stream._check_open()
        return stream

    # -- what the lease is -------------------------------------------------

    @property
    def stream(self) -> PooledStream:
        """The pooled stream this lease holds."""
        return self._live()

    @property
    def ptr(self) -> int:
        """The raw ``cudaStream_t`` as an int."""
        return self._live().ptr

    @property
    def cupy_stream(self) -> Any:
        """The ``cupy.cuda.Stream`` (the backend's stream on other backends)."""
        return self._live()._handle

    @property
    def affinity_key(self) -> object:
        """The key this lease was acquired with, or None."""
        return self._key

    @property
    def released(self) -> bool:
        """True once the lease was released."""
        return not self._slot

    def __cuda_stream__(self) -> tuple[int, int]:
        """The ``__cuda_stream__`` protocol: ``(0, ptr)``."""
        return (0, self._live().ptr)

    # -- stream-ordered operations -----------------------------------------

    def synchronize(self) -> None:
        """Block until the work queued on the lease's stream is done."""
        self._live().synchronize()

    def query(self) -> bool:
        """True when the work queued on the lease's stream has finished."""
        return self._live().query()

    def wait_event(self, event: PooledEvent) -> None:
        """Make later work on this lease wait for ``event`` (on the device)."""
        self._live().wait_event(event)

    def wait(self, other: object) -> None:
        """Make later work on this lease wait for the work queued so far on ``other``.

        Args:
            other: Another lease, a ``PooledEvent``, a pooled stream, a
                ``cupy.cuda.Stream``, an object with ``__cuda_stream__``, or a
                raw stream pointer int (0 is the legacy default stream).
        """
        stream = self._live()
        if isinstance(other, PooledEvent):
            stream.wait_event(other)
            return
        handle = resolve_stream(self._pool._backend, other, "other")
        if handle is stream._handle:
            return  # a stream is already ordered after its own work
        events = self._pool.events
        event = events.acquire()
        try:
            event.record(handle)
            stream.wait_event(event)
        finally:
            # CUDA captures the event's state at the wait, so it can go back now.
            events.release(event)

    def record_event(self) -> PooledEvent:
        """Record this lease's work so far into an event from the pool's event pool.

        Release the event (``event.release()``) when done with it.
        """
        return self._pool.record_event(self)

    def launch_host_func(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a host thread after the work queued so far on this lease."""
        self._live().launch_host_func(fn)

    # -- ending the lease --------------------------------------------------

    def release(self) -> None:
        """Return the stream to the pool; a second call raises ``LeaseError``."""
        self._pool.release(self)

    def __enter__(self) -> StreamLease:
        stream = self._live()
        if self._token is not None:
            raise LeaseError("this lease is already entered; a lease is entered once")
        self._token = (self._pool._backend.enter(stream._handle),)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        try:
            if token is not None:
                self._pool._backend.exit(token[0])
        finally:
            if self._slot:
                self._pool.release(self)

    def __del__(self) -> None:
        if not self._slot or _is_finalizing():
            return
        stream = self._slot[0]
        if stream.state is StreamState.CLOSED:
            return
        warnings.warn(
            f"a lease of {stream!r} was dropped without release(); returning it to "
            "the pool. Use `with pool.acquire_*():` or call lease.release().",
            ResourceWarning,
            stacklevel=1,
        )
        # e.g. still capturing a graph: a finalizer can do no better than leave it
        with contextlib.suppress(Exception):
            self._pool.release(self)

    def __repr__(self) -> str:
        if not self._slot:
            return "<StreamLease released>"
        key = "" if self._key is None else f" key={self._key!r}"
        return f"<StreamLease of {self._slot[0]!r}{key}>"
