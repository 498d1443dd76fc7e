"""CapturedGraph: a graph made by ``pool.capture()``, launched on any stream.

Locking: ``CapturedGraph._lock`` guards ``_graph`` and ``_state``; the graph
is launched and freed outside it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ._errors import PoolError
from ._stream_args import resolve_stream

if TYPE_CHECKING:
    from ._backends import Backend

__all__ = ["CapturedGraph"]

_CAPTURING = "its capture is still running; launch it after the capture's with block"


class CapturedGraph:
    """A CUDA graph captured by ``pool.capture()``: launch it on any stream, any number of times.

    ``graph.launch(stream)`` queues the whole captured step on ``stream`` with
    one call; work queued on ``stream`` afterwards runs after it. The graph
    replays the kernels with the arguments they were captured with: update
    the contents of their buffers between launches, never the buffers
    themselves. It holds no reference to the pool and may outlive it.
    ``close()`` (or leaving ``with graph:``) frees it. Thread-safe.

    On the host backend the graph replays the tasks recorded on the joined
    streams in the order they were recorded, serially, as one task on the
    launch stream: the captured schedule again, not a concurrent graph.
    """

    __slots__ = ("__weakref__", "_backend", "_graph", "_lock", "_state")

    _backend: Backend
    _graph: Any  # the backend's graph; None until the capture ended, and after close()
    _lock: threading.Lock
    _state: str  # why there is no graph to launch (read when _graph is None)

    def __new__(cls, *_: object) -> CapturedGraph:
        raise TypeError(
            "CapturedGraph has no public constructor; use `with pool.capture(origin) as graph:`"
        )

    @classmethod
    def _create(cls, backend: Backend) -> CapturedGraph:
        self = object.__new__(cls)
        self._backend = backend
        self._graph = None
        self._lock = threading.Lock()
        self._state = _CAPTURING
        return self

    def _finish(self, graph: Any, failure: str | None) -> None:
        with self._lock:
            if failure is None:
                self._graph, self._state = graph, "ready"
            else:
                self._state = f"its capture failed ({failure}); capture it again"

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (or the capture failed)."""
        with self._lock:
            return self._graph is None and self._state != _CAPTURING

    def launch(self, stream: object = None) -> None:
        """Queue the captured work on ``stream``, after the work queued there so far.

        Args:
            stream: Anything accepted as a stream (a lease, a pooled stream, a
                ``cupy.cuda.Stream``, an object with ``__cuda_stream__`` such as
                a torch stream, a raw pointer; 0 is the legacy default stream),
                or None for the calling thread's current stream.

        Raises:
            PoolError: The graph was closed, its capture failed, or the capture
                has not ended yet.
            TypeError, ValueError: ``stream`` is not a stream of the graph's device.
        """
        with self._lock:
            graph, state = self._graph, self._state
        if graph is None:
            raise PoolError(f"this graph cannot be launched: {state}")
        backend = self._backend
        target = (
            backend.current_stream()
            if stream is None
            else resolve_stream(backend, stream, "stream")
        )
        backend.launch_graph(graph, target)

    def close(self) -> None:
        """Free the graph; idempotent. Launches already queued still run."""
        with self._lock:
            graph, self._graph = self._graph, None
            if graph is not None:
                self._state = "it was closed (graph.close()); capture a new one"
        del graph  # the backend frees it with its last reference, outside the lock

    def __enter__(self) -> CapturedGraph:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            state = "ready" if self._graph is not None else self._state
        return f"<CapturedGraph {self._backend.name}:{self._backend.device} {state}>"
