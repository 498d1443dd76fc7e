"""The cupy backend: real CUDA streams and events through CuPy on one device."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

import cupy

from .. import _fastpath

__all__ = [
    "CUPY_STREAMS",
    "CupyBackend",
    "foreign_stream",
    "hardware_queues_from_env",
    "make_current",
    "restore_current",
]

_MAX_CONNECTIONS_VAR = "CUDA_DEVICE_MAX_CONNECTIONS"
# make_current(device, stream) and restore_current(device, saved) are in C:
# leases call them on every `with`, the adapters on every hand-off.
_fastpath.configure_cupy(
    get_device=cupy.cuda.runtime.getDevice,
    set_device=cupy.cuda.runtime.setDevice,
    get_current_stream=cupy.cuda.get_current_stream,
)
make_current = _fastpath.make_current
restore_current = _fastpath.restore_current


def hardware_queues_from_env() -> int:
    """The device's hardware work queues as ``CUDA_DEVICE_MAX_CONNECTIONS`` sets them."""
    raw = os.environ.get(_MAX_CONNECTIONS_VAR, "8")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 32:
        raise ValueError(
            f"{_MAX_CONNECTIONS_VAR}={raw!r} is not a whole number in [1, 32]; "
            "unset it (CUDA's default is 8) or set it to at most 32"
        )
    return value


@functools.cache
def _libcuda() -> ctypes.CDLL:
    # The driver library is always there where CuPy runs and needs no extra
    # package; it has the two calls below that CuPy does not expose cheaply.
    libcuda = ctypes.CDLL("libcuda.so.1")
    # The release hot path (C) asks it about graph capture without going
    # through Python: a pointer to cuStreamIsCapturing, which takes a
    # cudaStream_t as it is (CUstream) and answers for the stream's context.
    address = ctypes.cast(libcuda.cuStreamIsCapturing, ctypes.c_void_p).value
    _fastpath.set_capture_query(address or 0)
    return libcuda


def _driver_priority_range() -> tuple[int, int]:
    # CuPy does not expose cudaDeviceGetStreamPriorityRange; the driver call
    # answers for the context the runtime made current on this thread.
    least, greatest = ctypes.c_int(), ctypes.c_int()
    status = _libcuda().cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest))
    if status != 0:
        raise RuntimeError(f"cuCtxGetStreamPriorityRange failed with CUresult {status}")
    return least.value, greatest.value


class CupyBackend:
    """CuPy streams and events bound to one device; see ``Backend``."""

    name = "cupy"
    cupy_current = True

    def __init__(self, device: int) -> None:
        self.device = device
        self._device = cupy.cuda.Device(device)
        with self._device:
            cupy.cuda.runtime.free(0)  # make the primary context current
            self._priority_range = _driver_priority_range()

    def priority_range(self) -> tuple[int, int]:
        return self._priority_range

    def hardware_queues(self) -> int | None:
        return hardware_queues_from_env()

    def create_stream(self, priority: int, non_blocking: bool) -> Any:
        with self._device:
            return cupy.cuda.Stream(non_blocking=non_blocking, priority=priority)

    def destroy_stream(self, stream: Any) -> None:
        with self._device:
            stream.synchronize()
            # CuPy's pool keeps one arena per stream; without this the blocks
            # cached for a destroyed stream stay reserved for ever.
            # Only when CuPy's own pool is the allocator (not, say, torch's).
            allocator_owner = getattr(cupy.cuda.get_allocator(), "__self__", None)
            if allocator_owner is cupy.get_default_memory_pool():
                cupy.get_default_memory_pool().free_all_blocks(stream=stream)
        # The handle is destroyed when its last reference goes: a user still
        # holding ``lease.cupy_stream`` keeps a valid stream, never a dangling one.

    def stream_ptr(self, stream: Any) -> int:
        return int(stream.ptr)

    def create_event(self, timing: bool) -> Any:
        with self._device:
            return cupy.cuda.Event(block=False, disable_timing=not timing)

    def destroy_event(self, event: Any) -> None:
        pass  # freed with its last reference, like streams

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def query_stream(self, stream: Any) -> bool:
        return bool(stream.done)

    def synchronize_stream(self, stream: Any) -> None:
        stream.synchronize()

    def query_event(self, event: Any) -> bool:
        return bool(event.done)

    def synchronize_event(self, event: Any) -> None:
        event.synchronize()

    def elapsed_time(self, start: Any, end: Any) -> float:
        return float(cupy.cuda.get_elapsed_time(start, end))

    def launch_host_func(self, stream: Any, fn: Callable[[], None]) -> None:
        stream.launch_host_func(lambda _arg: fn(), None)

    def capture_probe(self, stream: Any) -> Callable[[], int]:
        # Bound once per stream: the release fast path pays one C call
        # (cudaStreamIsCapturing; 0 means not capturing).
        return functools.partial(cupy.cuda.runtime.streamIsCapturing, stream.ptr)

    def capture_handle(self, stream: Any) -> int:
        return int(stream.ptr)

    def current_stream(self) -> Any:
        return cupy.cuda.get_current_stream(self.device)

    def enter(self, stream: Any) -> Any:
        return make_current(self.device, stream)

    def exit(self, token: Any) -> None:
        restore_current(self.device, token)

    def as_stream(self, obj: object) -> Any:
        with self._device:  # a foreign pointer is taken to be on this device
            return foreign_stream(obj)


CUPY_STREAMS = (cupy.cuda.Stream, cupy.cuda.ExternalStream)


class _Pointer:
    """A raw pointer dressed in the ``__cuda_stream__`` protocol, for CuPy."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def foreign_stream(obj: object) -> Any:
    """A CuPy stream for a CuPy stream, an object with ``__cuda_stream__`` or a raw pointer.

    Pointers and protocol objects are wrapped on the current device, through
    ``cupy.cuda.Stream.from_external``, which checks the protocol strictly.
    Pointer 0 is CuPy's legacy-stream singleton.

    Raises:
        TypeError: Anything else, or a malformed ``__cuda_stream__`` result.
    """
    if isinstance(obj, CUPY_STREAMS):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        if obj == 0:
            return cupy.cuda.Stream.null
        obj = _Pointer(obj)
    elif not hasattr(obj, "__cuda_stream__"):
        raise TypeError(f"{obj!r} is not a stream")
    try:
        handle = cupy.cuda.Stream.from_external(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{type(obj).__name__}.__cuda_stream__() must return a tuple (0, ptr) of ints: {exc}"
        ) from None
    return cupy.cuda.Stream.null if handle.ptr == 0 else handle
