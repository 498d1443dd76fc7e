"""The seam between the pool logic and the device: one small protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ._callbacks import HostCall

__all__ = ["Backend"]


class Backend(Protocol):
    """What a pool needs from a device.

    Stream and event handles are opaque to the pool (``Any`` here): the cupy
    backend hands out ``cupy.cuda.Stream`` / ``cupy.cuda.Event``, the host
    backend its own thread-driven objects. Every method may be called from any
    thread, and none runs Python code on a thread that CUDA started.
    """

    name: str
    device: int

    def priority_range(self) -> tuple[int, int]:
        """``(least, greatest)`` priority, in CUDA's numbers (greatest is lowest)."""
        ...

    def hardware_queues(self) -> int | None:
        """Hardware work queues streams are spread over, or None if unbounded."""
        ...

    def create_stream(self, priority: int, non_blocking: bool) -> Any: ...

    def destroy_stream(self, stream: Any) -> None:
        """Wait for the stream's work, free memory cached for it, drop it."""
        ...

    def stream_ptr(self, stream: Any) -> int: ...

    def create_event(self, timing: bool) -> Any: ...

    def record(self, event: Any, stream: Any) -> None: ...

    def wait_event(self, stream: Any, event: Any) -> None: ...

    def query_stream(self, stream: Any) -> bool: ...

    def synchronize_stream(self, stream: Any) -> None:
        """Wait for the stream's work and for the host functions launched on it so far."""
        ...

    def query_event(self, event: Any) -> bool: ...

    def synchronize_event(self, event: Any) -> None: ...

    def elapsed_time(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded timing events."""
        ...

    def launch_host_func(self, stream: Any, fn: HostCall) -> None:
        """Run ``fn(None)`` on a thread of the library once the stream's earlier work
        is done (``fn(error)`` if waiting for it failed). ``fn`` must not raise (the
        pool wraps users' functions)."""
        ...

    def is_capturing(self, stream: Any) -> bool:
        """True while ``stream`` is capturing a CUDA graph (never on backends without graphs)."""
        ...

    def capture_id(self, stream: Any) -> int | None:
        """The id of the capture ``stream`` takes part in (the same for every stream
        of one capture, on any backend object), or None unless it is capturing
        (an invalidated capture has no id)."""
        ...

    def capture_probe(self, stream: Any) -> Callable[[], int] | None:
        """A callable answering ``is_capturing(stream)`` in one cheap call (non-zero:
        capturing), or None on backends without graphs."""
        ...

    def begin_capture(self, stream: Any) -> None:
        """Begin capturing a graph on ``stream`` (CUDA's relaxed mode, CuPy's default)."""
        ...

    def end_capture(self, stream: Any) -> Any:
        """End the capture begun on ``stream`` and return its graph, ready to launch.

        Every stream that took part leaves capture mode, also when ending fails
        (a stream not joined back, an invalidated capture), which raises.
        """
        ...

    def launch_graph(self, graph: Any, stream: Any) -> None:
        """Queue a graph from ``end_capture`` on ``stream``."""
        ...

    def default_stream(self) -> Any:
        """The device's legacy default stream (pointer 0 in CUDA's numbers)."""
        ...

    def current_stream(self) -> Any:
        """The calling thread's current stream on this backend's device."""
        ...

    def enter(self, stream: Any) -> Any:
        """Make the device and ``stream`` current on this thread; return a token."""
        ...

    def exit(self, token: Any) -> None:
        """Restore what ``enter`` replaced."""
        ...

    def as_stream(self, obj: object) -> Any:
        """Turn a foreign stream (a framework stream, ``__cuda_stream__``, a raw
        pointer) into a handle, or raise ``TypeError``."""
        ...

    def close(self, lock_wait: float = -1) -> None:
        """Stop the backend's own threads once their work is done (idempotent).

        ``lock_wait`` bounds each wait for a lock (see ``EventPool._close``).
        """
        ...
