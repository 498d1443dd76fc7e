"""StreamLease: the exclusive, one-shot handle on a pooled stream."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import LeaseError
from ._events import PooledEvent
from ._stream_args import pooled_source, resolve_stream
from ._types import StreamState

if TYPE_CHECKING:
    from ._backends import Backend
    from ._stream import PooledStream

__all__ = ["StreamLease", "new_lease"]

# Bound early, as CuPy does, so a lease collected at interpreter shutdown does
# not touch half-torn-down modules.
_is_finalizing = sys.is_finalizing
_now_ns = time.perf_counter_ns
_LEASED = StreamState.LEASED
_IDLE = StreamState.IDLE


def new_lease(stream: PooledStream, key: Hashable | None) -> StreamLease:
    """Hand ``stream`` (just taken from its lane) to a fresh lease."""
    stream.state = _LEASED
    stream._acquisitions += 1
    stream._lease_start = _now_ns()
    lease = _new_object(StreamLease)
    lease._slot = [stream]  # one-element hold; list.pop() is the atomic release
    lease._key = key
    lease._token = None
    return lease


_new_object = object.__new__


class StreamLease:
    """Exclusive use of one pooled stream until ``release()``.

    Entering the lease (``with``) makes its device and stream current on the
    calling thread, for CuPy and for the pool; leaving restores both and
    releases the lease. After release every method raises ``LeaseError``.
    A lease is meant for one thread at a time; the pool itself is
    thread-safe. A lease dropped without release goes back to the pool when it
    is collected, with a ``ResourceWarning``.
    """

    __slots__ = ("__weakref__", "_key", "_slot", "_token")

    _key: Hashable | None
    _slot: list[PooledStream]
    _token: tuple[Backend, Any] | None

    def __new__(cls, *_: object) -> StreamLease:
        # object.__new__ is how the pool makes them, bypassing this.
        raise TypeError(
            "StreamLease has no public constructor; use pool.acquire_compute() "
            "or another pool.acquire_*() method"
        )

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
        # The hold list is unique to this lease: it tags this lease's host-function errors.
        self._live()._synchronize(self._slot)

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
        # Record on the producer's own device (a pooled stream of another
        # device brings its pool's events); CUDA lets a stream wait on an
        # event of any device.
        source = pooled_source(other)
        backend = stream._backend if source is None else source._backend
        handle = resolve_stream(backend, other, "other")
        if handle is stream._handle:
            return  # a stream is already ordered after its own work
        events = stream._pool.events if source is None else source._pool.events
        event = events.acquire()
        try:
            backend.record(event._handle, handle)
            stream.wait_event(event)
        finally:
            # CUDA captures the event's state at the wait, so it can go back now.
            events.release(event)

    def record_event(self) -> PooledEvent:
        """Record this lease's work so far into an event from the pool's event pool.

        Release the event (``event.release()``) when done with it.
        """
        return self._live()._pool.record_event(self)

    def launch_host_func(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a host thread after the work queued so far on this lease.

        ``fn`` must not call CUDA. An exception it raises is raised by this
        lease's next ``synchronize()`` (or by ``pool.sync_all()``), never by a
        later lease of the same stream.
        """
        self._live()._launch_host_func(fn, self._slot)

    # -- ending the lease --------------------------------------------------

    def release(self) -> None:
        """Return the stream to the pool; a second call raises ``LeaseError``.

        Raises:
            LeaseError: Released already, or the stream is still capturing a
                CUDA graph (end the capture first).
        """
        # The uncontended path is the library's hot loop: no lock, no call
        # that can be avoided. Anything unusual goes to the pool's slow path.
        slot = self._slot
        try:
            stream = slot[0]
        except IndexError:
            raise LeaseError("this lease was already released") from None
        capturing = stream._capturing
        if (
            self._key is not None
            or stream.state is not _LEASED
            or (capturing is not None and capturing())
        ):
            stream._pool._release_slow(self, stream)
            return
        try:
            slot.pop()  # atomic: of two racing releases, one gets here
        except IndexError:
            raise LeaseError("this lease was already released") from None
        stream._active_ns += _now_ns() - stream._lease_start
        stream.state = _IDLE
        lane = stream._lane
        lane.idle.append(stream)
        if lane.waiters:
            lane.hand_off_locked()

    def __enter__(self) -> StreamLease:
        try:
            stream = self._slot[0]
        except IndexError:
            raise LeaseError("this lease was released; acquire a new one") from None
        if stream.state is not _LEASED:
            stream._check_open()
        if self._token is not None:
            raise LeaseError("this lease is already entered; a lease is entered once")
        backend = stream._backend
        self._token = (backend, backend.enter(stream._handle))
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
                token[0].exit(token[1])
        finally:
            if self._slot:
                self.release()

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
            self.release()

    def __repr__(self) -> str:
        if not self._slot:
            return "<StreamLease released>"
        key = "" if self._key is None else f" key={self._key!r}"
        return f"<StreamLease of {self._slot[0]!r}{key}>"
