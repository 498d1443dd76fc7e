"""StreamLease: the exclusive, one-shot handle on a pooled stream."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _fastpath
from ._errors import LeaseError
from ._events import PooledEvent
from ._fastpath import LeaseCore
from ._stream_args import pooled_source, resolve_stream
from ._teardown import on_a_thread_python_did_not_start, park_lease
from ._types import StreamState

if TYPE_CHECKING:
    from ._stream import PooledStream

__all__ = ["StreamLease"]

# Bound early, as CuPy does, so a lease collected at interpreter shutdown does
# not touch half-torn-down modules.
_is_finalizing = sys.is_finalizing


class StreamLease(LeaseCore):
    """Exclusive use of one pooled stream until ``release()``.

    Entering the lease (``with``) makes its device and stream current on the
    calling thread, for CuPy and for the pool; leaving restores both and
    releases the lease. After release every method raises ``LeaseError``.
    A lease is meant for one thread at a time; the pool itself is
    thread-safe. A lease dropped without release goes back to the pool when it
    is collected, with a ``ResourceWarning``.

    ``release()``, ``__enter__``, ``__exit__`` and the fields they touch
    live in the C base ``LeaseCore`` (``new_lease`` makes leases); a released
    lease holds no stream.
    """

    __slots__ = ()

    def __new__(cls, *_: object) -> StreamLease:
        # new_lease is how the pool makes them, bypassing this.
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
        return self._live()._handle

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
        self._live()._launch_host_func(fn, self._serial)

    # -- ending the lease --------------------------------------------------

    # release(), __enter__ and __exit__ are LeaseCore's, in C: the library's
    # hot loop. Anything unusual (a key, a capturing or closed stream) goes to
    # pool._release_slow; entering goes through backend.enter, or on the cupy
    # backend through make_current, also in C.

    def _release_dropped(self) -> None:
        """Return the stream of a lease being collected unreleased (LeaseCore calls this)."""
        stream = self._stream
        if stream is None or _is_finalizing() or stream.state is StreamState.CLOSED:
            return
        if on_a_thread_python_did_not_start():
            park_lease(self)  # a release may call CUDA, which CUDA's own threads refuse
            return
        try:
            # e.g. still capturing a graph: a finalizer can do no better than leave it
            with contextlib.suppress(Exception):
                self.release()
        finally:
            # After the release: a warning turned into an error must not keep the stream.
            warnings.warn(
                f"a lease of {stream!r} was dropped without release(); it was returned "
                "to the pool. Use `with pool.acquire_*():` or call lease.release().",
                ResourceWarning,
                stacklevel=1,
            )

    def _release_parked(self) -> None:
        """Release a lease whose finalizer ran on CUDA's thread (the teardown thread calls this)."""
        stream = self._stream
        pool = None if stream is None else stream._pool
        try:
            self._release_dropped()
        finally:
            if pool is not None and not pool._finalizer.alive:
                # Collected with this lease and brought back by it: its
                # finalizer is spent, so its CUDA objects go here, by close().
                pool.close()

    def __repr__(self) -> str:
        stream = self._stream
        if stream is None:
            return "<StreamLease released>"
        key = "" if self._key is None else f" key={self._key!r}"
        return f"<StreamLease of {stream!r}{key}>"


_fastpath.configure(
    lease_class=StreamLease,
    event_class=PooledEvent,
    lease_error=LeaseError,
    leased=StreamState.LEASED,
    idle=StreamState.IDLE,
)
