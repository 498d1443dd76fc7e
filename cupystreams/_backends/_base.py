"""The seam between the pool logic and the device: one small protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Backend"]


class Backend(Protocol):
    """What a pool needs from a device.

    Stream and event handles are opaque to the pool (``Any`` here): the cupy
    backend hands out ``cupy.cuda.Stream`` / ``cupy.cuda.Event``, the host
    backend its own thread-driven objects. Every method may be called from any
    thread.
    """

    name: str
    device: int
    #: Entering a stream is CuPy's ``make_current(device, stream)``: leases
    #: then do it in C instead of calling ``enter`` and ``exit``.
    cupy_current: bool

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

    def destroy_event(self, event: Any) -> None: ...

    def record(self, event: Any, stream: Any) -> None: ...

    def wait_event(self, stream: Any, event: Any) -> None: ...

    def query_stream(self, stream: Any) -> bool: ...

    def synchronize_stream(self, stream: Any) -> None: ...

    def query_event(self, event: Any) -> bool: ...

    def synchronize_event(self, event: Any) -> None: ...

    def elapsed_time(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded timing events."""
        ...

    def launch_host_func(self, stream: Any, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a host thread once the stream's earlier work is done."""
        ...

    def capture_probe(self, stream: Any) -> Callable[[], int] | None:
        """A cheap callable answering "is ``stream`` capturing a graph?" (non-zero
        when it is), or None when the backend has no graphs."""
        ...

    def capture_handle(self, stream: Any) -> int:
        """The raw ``CUstream`` that the C release path asks the driver about, or
        0 when the backend has no graphs."""
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
