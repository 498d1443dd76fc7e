"""The cupy backend: real CUDA streams and events through CuPy on one device."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

import cupy

from .. import _capturing
from ._callbacks import CallbackThread, HostCall

__all__ = [
    "CUPY_STREAMS",
    "CupyBackend",
    "foreign_stream",
    "hardware_queues_from_env",
    "make_current",
    "restore_current",
]

_MAX_CONNECTIONS_VAR = "CUDA_DEVICE_MAX_CONNECTIONS"
_get_device = cupy.cuda.runtime.getDevice
_set_device = cupy.cuda.runtime.setDevice
_get_current_stream = cupy.cuda.get_current_stream
_is_capturing = cupy.cuda.runtime.streamIsCapturing


def make_current(device: int, stream: Any) -> tuple[int, Any]:
    """Make ``device`` and its CuPy ``stream`` current on this thread.

    Returns what ``restore_current`` needs: the device current before, and
    the stream that was current on ``device``. A failed step undoes the
    device switch.
    """
    previous = _get_device()
    if previous != device:
        _set_device(device)  # CuPy makes a stream current only on its own device
    try:
        saved = (previous, _get_current_stream(device))
        stream.use()
    except BaseException:
        if previous != device:
            _set_device(previous)
        raise
    return saved


def restore_current(device: int, saved: tuple[int, Any]) -> None:
    """Undo ``make_current(device, ...)``, which returned ``saved``.

    The block may have left another device current: the stream is restored
    on ``device`` all the same, and the device current before
    ``make_current`` comes back even if restoring the stream fails.
    """
    previous, stream = saved
    now = _get_device()
    if now != device:
        _set_device(device)
    try:
        stream.use()
    finally:
        if previous != device:
            _set_device(previous)


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
    # package; it answers what CuPy does not expose (the priority range, a
    # stream's capture id).
    return ctypes.CDLL("libcuda.so.1")


def _driver_priority_range() -> tuple[int, int]:
    # The driver call answers for the context the runtime made current on
    # this thread.
    least, greatest = ctypes.c_int(), ctypes.c_int()
    status = _libcuda().cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest))
    if status != 0:
        raise RuntimeError(f"cuCtxGetStreamPriorityRange failed with CUresult {status}")
    return least.value, greatest.value


def _capture_id(stream_ptr: int) -> int | None:
    """The id of the capture the stream takes part in, or None (CuPy does not
    expose ``cudaStreamGetCaptureInfo``). The versioned driver entry point
    keeps its signature across CUDA releases; its optional outputs are NULL."""
    status, ident = ctypes.c_int(), ctypes.c_uint64()
    result = _libcuda().cuStreamGetCaptureInfo_v2(
        ctypes.c_void_p(stream_ptr), ctypes.byref(status), ctypes.byref(ident), None, None, None
    )
    if result != 0:
        raise RuntimeError(f"cuStreamGetCaptureInfo_v2 failed with CUresult {result}")
    # 1: CU_STREAM_CAPTURE_STATUS_ACTIVE (an invalidated capture leaves the id unwritten)
    return ident.value if status.value == 1 else None


def _wait_for_event(event: Any) -> None:
    event.synchronize()


class CupyBackend:
    """CuPy streams and events bound to one device; see ``Backend``."""

    name = "cupy"

    def __init__(self, device: int) -> None:
        self.device = device
        self._device = cupy.cuda.Device(device)
        with self._device:
            cupy.cuda.runtime.free(0)  # make the primary context current
            self._priority_range = _driver_priority_range()
        self._callbacks = CallbackThread(_wait_for_event, f"cupystreams-host-functions-{device}")

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

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def query_stream(self, stream: Any) -> bool:
        return bool(stream.done)

    def synchronize_stream(self, stream: Any) -> None:
        stream.synchronize()
        self._callbacks.wait_for(stream.ptr)

    def query_event(self, event: Any) -> bool:
        return bool(event.done)

    def synchronize_event(self, event: Any) -> None:
        event.synchronize()

    def elapsed_time(self, start: Any, end: Any) -> float:
        return float(cupy.cuda.get_elapsed_time(start, end))

    def launch_host_func(self, stream: Any, fn: HostCall) -> None:
        if self.is_capturing(stream):
            raise RuntimeError(
                "a host function cannot be captured into a CUDA graph by this pool; "
                "launch it after the capture ends"
            )
        _capturing.refuse(
            self.name,
            self.device,
            "launching a host function (it needs a new CUDA event)",
            "launch it after",
        )
        with self._device:
            # A blocking-sync event lets the waiting thread sleep instead of spin.
            event = cupy.cuda.Event(block=True, disable_timing=True)
        event.record(stream)
        self._callbacks.launch(stream.ptr, event, fn)

    def is_capturing(self, stream: Any) -> bool:
        return bool(_is_capturing(stream.ptr))

    def capture_id(self, stream: Any) -> int | None:
        return _capture_id(stream.ptr)

    def capture_probe(self, stream: Any) -> Callable[[], int]:
        # Bound once per stream: a release pays one call (cudaStreamIsCapturing).
        return functools.partial(_is_capturing, stream.ptr)

    def begin_capture(self, stream: Any) -> None:
        stream.begin_capture()  # relaxed mode: CuPy's default

    def end_capture(self, stream: Any) -> Any:
        with self._device:  # the graph is instantiated on the stream's device
            return stream.end_capture()

    def launch_graph(self, graph: Any, stream: Any) -> None:
        with self._device:
            graph.launch(stream)

    def default_stream(self) -> Any:
        return cupy.cuda.Stream.null

    def current_stream(self) -> Any:
        return _get_current_stream(self.device)

    def enter(self, stream: Any) -> Any:
        # CuPy's own `with stream:`, the cheapest switch there is; it refuses a
        # stream of another device than the current one, which is switched first.
        try:
            stream.__enter__()
            return stream
        except RuntimeError:
            previous = _get_device()
            if previous == self.device:
                raise
        _set_device(self.device)
        try:
            stream.__enter__()
        except BaseException:
            _set_device(previous)
            raise
        return (stream, previous)

    def exit(self, token: Any) -> None:
        stream, previous = token if type(token) is tuple else (token, self.device)
        # CuPy pops the stream for the device that is current when the stream
        # has none of its own (the legacy stream), so the block's device, if it
        # switched, must not be current while it does.
        if _get_device() != self.device:
            _set_device(self.device)
        try:
            stream.__exit__(None, None, None)
        finally:
            if previous != self.device:
                _set_device(previous)  # the device current before the lease was entered

    def as_stream(self, obj: object) -> Any:
        with self._device:  # a foreign pointer is taken to be on this device
            return foreign_stream(obj)

    def close(self, lock_wait: float = -1) -> None:
        self._callbacks.close(lock_wait)


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
