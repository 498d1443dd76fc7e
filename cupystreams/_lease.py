"""StreamLease: the exclusive, one-shot handle on a pooled stream."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import LeaseError
from ._events import PooledEvent
from ._stream_args import pooled_source, resolve_stream

if TYPE_CHECKING:
    from ._affinity import KeyState
    from ._stream import PooledStream

__all__ = ["StreamLease"]


class StreamLease:
    """Exclusive use of one pooled stream until ``release()``.

    Entering the lease (``with``) makes its device and stream current on the
    calling thread, for CuPy and for the pool; leaving restores the device,
    and the stream as CuPy's own ``with stream:`` does (that of the enclosing
    ``with`` block: a stream made current by ``stream.use()`` is not), and
    releases the lease. After release every method raises ``LeaseError``.
    A lease is meant for one thread at a time; the pool itself is
    thread-safe. A lease dropped without release goes back to the pool when it
    is collected, with a ``ResourceWarning``.
    """

    __slots__ = ("__weakref__", "_entered", "_key", "_key_state", "_saved", "_serial", "_stream")

    _entered: PooledStream | None  # the stream made current by __enter__
    _key: Hashable | None
    _key_state: KeyState | None  # the pool's record of the key, ended with the lease
    _saved: Any  # what entering saved, for __exit__
    _serial: int  # the stream's acquisition number: tags this lease's host-function errors
    _stream: PooledStream | None  # None once released

    def __new__(cls, *_: object) -> StreamLease:
        raise TypeError(
            "StreamLease has no public constructor; use pool.acquire_compute() "
            "or another pool.acquire_*() method"
        )

    def _live(self) -> PooledStream:
        stream = self._stream
        if stream is None:
            raise LeaseError("this lease was released; acquire a new one")
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
        return self._live()._open_handle()

    @property
    def affinity_key(self) -> object:
        """The key this lease was acquired with, or None."""
        return self._key

    @property
    def released(self) -> bool:
        """True once the lease was released."""
        return self._stream is None

    def __cuda_stream__(self) -> tuple[int, int]:
        """The ``__cuda_stream__`` protocol: ``(0, ptr)``."""
        return (0, self._live().ptr)

    # -- stream-ordered operations -----------------------------------------

    def synchronize(self) -> None:
        """Block until the work queued on the lease's stream is done."""
        # The serial is unique to this lease: it tags this lease's host-function errors.
        self._live()._synchronize(self._serial)

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

        Raises:
            ValueError: ``other`` is this lease (or its stream): a stream is
                always ordered after its own work, so the call is a mistake.
        """
        stream = self._live()
        if isinstance(other, PooledEvent):
            stream.wait_event(other)
            return
        # Record on the producer's own device (a pooled stream of another
        # device brings its pool's events); CUDA lets a stream wait on an
        # event of any device.
        source = pooled_source(other)
        if source is stream:
            raise ValueError(
                "other= is this lease's own stream, which is always ordered after its "
                "own work; pass another lease, stream or event"
            )
        backend = stream._backend if source is None else source._backend
        handle = resolve_stream(backend, other, "other")
        events = stream._core.events if source is None else source._core.events
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
        stream = self._live()
        handle = stream._open_handle()
        events = stream._core.events
        event = events.acquire()
        try:
            stream._backend.record(event._handle, handle)
        except BaseException:
            events.release(event)
            raise
        return event

    def launch_host_func(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a thread of the library after the work queued so far.

        ``fn`` must not call CUDA. Later work on the stream does not wait for
        ``fn``; this lease's ``synchronize()`` does. An exception ``fn``
        raises is raised by this lease's next ``synchronize()`` (or by
        ``pool.sync_all()``), never by a later lease of the same stream.
        """
        self._live()._launch_host_func(fn, self._serial)

    # -- entering and ending the lease ---------------------------------------

    def __enter__(self) -> StreamLease:
        stream = self._stream
        if stream is None:
            raise LeaseError("this lease was released; acquire a new one")
        if self._entered is not None:
            raise LeaseError("this lease is already entered; a lease is entered once")
        self._saved = stream._backend.enter(stream._open_handle())
        self._entered = stream
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = self._entered
        failure: BaseException | None = None
        if entered is not None:
            # The stream entered, not the lease's: the block may have released it.
            self._entered = None
            try:
                entered._backend.exit(self._saved)
            except BaseException as error:
                failure = error
        if self._stream is not None:
            try:
                self.release()
            except BaseException as error:
                error.__context__ = failure
                raise
        if failure is not None:
            raise failure

    def release(self) -> None:
        """Return the stream to the pool; a second call raises ``LeaseError``.

        A no-op once the pool is closed.

        Raises:
            LeaseError: Released already, or the stream is still capturing a
                CUDA graph (end the capture first).
        """
        stream = self._stream
        if stream is None:
            raise LeaseError("this lease was already released")
        stream._core.release(self, stream)

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # The safety net for a lease dropped unreleased. Bound early, as CuPy
        # does: at interpreter shutdown the modules it needs may be gone.
        stream = self._stream
        if stream is None or _finalizing():
            return
        core = stream._core
        if core.closed_reason is not None:
            return
        core.return_dropped(stream, self._key_state)
        # After the return: a warning turned into an error must not keep the stream.
        warnings.warn(
            f"a lease of {stream!r} was dropped without release(); it was returned "
            "to the pool. Use `with pool.acquire_*():` or call lease.release().",
            ResourceWarning,
            stacklevel=1,
        )

    def __repr__(self) -> str:
        stream = self._stream
        if stream is None:
            return "<StreamLease released>"
        key = "" if self._key is None else f" key={self._key!r}"
        return f"<StreamLease of {stream!r}{key}>"
