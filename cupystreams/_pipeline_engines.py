"""Where a pipeline's buffers live and how its three stages run, per backend.

The pipeline's loop (``cupystreams.pipeline``) is the same on every backend;
an engine supplies the backend-specific parts: host and device buffers, the
copy-in, the user's compute and the copy-out, each queued on a lease's stream.
On the cupy backend the copies are ``cudaMemcpyAsync`` calls and the compute is
the user's callable launching kernels on the current stream. On the host
backend every stage is a host function run by the stream's worker thread, so
the same ordering rules (events between stages) are exercised without a GPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import _gather_kernel, _page_lock
from ._page_lock import live_unlocks

if TYPE_CHECKING:
    from ._backends import Backend
    from ._events import PooledEvent
    from ._lease import StreamLease

__all__ = [
    "Check",
    "CupyEngine",
    "Destination",
    "Engine",
    "HostEngine",
    "Pending",
    "RunState",
    "host_copy",
    "stream_of",
]

#: Given the user's result for a chunk, the host array to copy it into and
#: that array's address (computed by the run from its base, not per chunk:
#: ``ndarray.ctypes`` costs microseconds).
Destination = Callable[[Any], tuple[np.ndarray, int]]
#: Refuses (raises) a result of ``fn`` for the run's rows ``start:stop`` that
#: does not fit the output: ``check(result, start, stop)``.
Check = Callable[[Any, int, int], None]

# Staging copies of pageable arrays are host memcpys, which scale with threads
# up to about a dozen (measured on two H200 hosts, 1 GiB each way: 9.5 GB/s on
# one thread, 32 GB/s on eight, 37 GB/s on sixteen; a pageable first run took
# 90-106 ms with eight threads and 86 ms with sixteen). numpy releases the GIL
# while it copies, so plain threads do.
_COPY_THREADS = min(16, os.cpu_count() or 1)
_COPY_PIECE_BYTES = 1 << 20
_copier: concurrent.futures.ThreadPoolExecutor | None = None
_copier_lock = threading.Lock()


def host_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dst, src)``, split along the first axis over up to 16 threads if big."""
    pieces = min(_COPY_THREADS, dst.nbytes // _COPY_PIECE_BYTES, dst.shape[0] if dst.ndim else 1)
    if pieces < 2:
        np.copyto(dst, src)
        return
    global _copier
    with _copier_lock:
        if _copier is None:
            _copier = concurrent.futures.ThreadPoolExecutor(
                _COPY_THREADS, thread_name_prefix="cupystreams-copy"
            )
        copier = _copier
    bounds = [dst.shape[0] * i // pieces for i in range(pieces + 1)]
    futures = []
    try:
        for start, stop in itertools.pairwise(bounds):
            futures.append(copier.submit(np.copyto, dst[start:stop], src[start:stop]))
        for future in futures:
            future.result()
    except BaseException:
        # Interrupted, or a piece failed: no piece may still write into dst
        # (a staging buffer the run frees, or the caller's out) once this
        # raises. Pieces not started are dropped; running ones are waited for.
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise


def _forget_copier_after_fork() -> None:
    global _copier, _copier_lock
    _copier, _copier_lock = None, threading.Lock()  # the parent's threads are not ours


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copier_after_fork)


def stream_of(lease: StreamLease) -> Any:
    """The backend stream of a lease the run holds, without the public checks.

    A run checks its leases once, when it acquires them; per chunk it goes
    straight to the handle (the public ``lease.ptr`` checks the pool each time).
    """
    stream = lease._stream
    if stream is None or stream._handle is None:
        lease._live()  # raises the error that says why
    assert stream is not None
    return stream._handle


class RunState:
    """What one run shares with the work it queued: the first failure wins.

    On the host backend the stages run on worker threads; they record their
    exception here instead of raising it on a thread nobody joins, and skip
    their work once a failure is recorded.
    """

    __slots__ = ("_lock", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        if self.error is not None:
            raise self.error


class Pending:
    """The user's result for one chunk: set at once (cupy) or by a worker (host)."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value


class Engine(Protocol):
    """The backend-specific half of a pipeline."""

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Make the pool's device current for the block (copies and allocations)."""
        ...

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A host array the copies can use directly (page-locked on a GPU)."""
        ...

    def make_direct(self, array: np.ndarray) -> bool:
        """Whether the copies can use ``array`` without a staging buffer, after
        page-locking it in place where the engine would."""
        ...

    def direct_address(self, array: np.ndarray, holds: list[Any]) -> int | None:
        """``array``'s address when ``make_direct(array)``, else None (it is staged).

        Where ``array`` is page-locked in place, it stays so until
        ``release(holds)``: a hold on it is added to ``holds``.
        """
        ...

    def release(self, holds: list[Any]) -> None:
        """Let go of the holds ``direct_address`` added to ``holds`` (and empty it)."""
        ...

    def device_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any: ...

    def graph_memory(self) -> contextlib.AbstractContextManager[Any]:
        """Serve the block's device allocations from a memory pool of their own
        (yielded; None where there is none), kept for a captured graph's life."""
        ...

    def record(self, event: PooledEvent, lease: StreamLease) -> None:
        """Record ``lease``'s work so far into ``event`` (both held by the run)."""
        ...

    def wait(self, lease: StreamLease, event: PooledEvent) -> None:
        """Make ``lease``'s later work wait for ``event``."""
        ...

    def synchronize(self, event: PooledEvent) -> None:
        """Block until ``event``'s work is done."""
        ...

    def copy_in(
        self, lease: StreamLease, dst: Any, src: np.ndarray, src_ptr: int, state: RunState
    ) -> None:
        """Queue the copy of host ``src`` (at address ``src_ptr``) into device ``dst``."""
        ...

    def compute(
        self,
        lease: StreamLease,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        results: Sequence[Pending],
        state: RunState,
    ) -> None:
        """Queue ``fn(x)`` for each of ``chunks`` on ``lease``, into ``results``.

        The lease's stream is current while ``fn`` runs, made so once for all
        of them. The caller holds ``results`` first, so a failure half-way
        loses none that the device may still write.
        """
        ...

    def gather(
        self,
        lease: StreamLease,
        results: Sequence[Pending],
        into: Any,
        chunks: Sequence[tuple[int, int]],
        start: int,
        check: Check,
        state: RunState,
    ) -> None:
        """Queue, on ``lease`` after ``fn``, the copy of each result into device
        buffer ``into``, whose row 0 is the run's row ``start``: the result for
        the run's rows ``chunks[i]`` goes to those rows, once ``check(result,
        *chunks[i])`` accepted it."""
        ...

    def copy_out(
        self, lease: StreamLease, result: Pending, destination: Destination, state: RunState
    ) -> None:
        """Queue the copy of the result into ``destination(result)`` on ``lease``."""
        ...


#: What ``_KnownDirect`` knows of an array: its address, and the page locks'
#: entry of its pages where they locked it in place (None: CuPy's pinned memory).
_Known = tuple[int, "_page_lock._Locked | None"]


class _KnownDirect:
    """The last few host arrays found direct (page-locked), with their addresses.

    Asking the driver whether an array is page-locked and reading its address
    (``ndarray.ctypes``) cost the host microseconds each, before a run's first
    copy, while the device waits; and a pipeline mostly runs the same arrays
    again. An array found direct stays so while it lives (its pages are CuPy's
    pinned memory, or locked in place until it dies), unless page locks of
    this process unlock it to make room: ``live_unlocks()`` changes then, and
    every array is asked about again; and one locked in place is remembered
    with its page locks' entry, which every run holds while it copies (so
    that they cannot unlock it meanwhile). (Memory a caller unlocks behind
    our back is still copied right, by the driver's own staging, only slower.)

    An array is known by its id and a weak reference to it (so that a new
    array under a dead one's id is not taken for it), with its shape and
    strides (not reshaped in place since). The weak reference also makes
    numpy refuse ``resize()`` on it, as it does for any array locked in place.

    Locking: ``_lock`` guards changes to ``_known`` (a leaf lock, no CUDA call
    under it); ``get`` reads it without the lock, one dict lookup.
    """

    _MOST = 8  # arrays remembered; the oldest is forgotten first

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(array) -> (a weak reference to it, its shape and strides, live_unlocks(),
        # what get() returns)
        self._known: dict[
            int,
            tuple[weakref.ref[np.ndarray], tuple[int, ...], tuple[int, ...], int, _Known],
        ] = {}

    def get(self, array: np.ndarray, unlocks: int) -> _Known | None:
        """``array``'s address, and its page locks' entry where they locked it in
        place, if it was found direct when ``live_unlocks()`` was ``unlocks``."""
        known = self._known.get(id(array))
        if known is None:
            return None
        ref, shape, strides, seen_at, found = known
        same = ref() is array and seen_at == unlocks
        return found if same and array.shape == shape and array.strides == strides else None

    def put(self, array: np.ndarray, found: _Known, unlocks: int) -> None:
        entry = (weakref.ref(array), array.shape, array.strides, unlocks, found)
        with self._lock:
            self._known.pop(id(array), None)
            self._known[id(array)] = entry  # newest last
            while len(self._known) > self._MOST:
                del self._known[next(iter(self._known))]


class CupyEngine:
    """Page-locked host buffers, CuPy device buffers, ``cudaMemcpyAsync`` copies."""

    def __init__(self, backend: Backend, page_lock: bool = True) -> None:
        import cupy

        from ._page_lock import cupy_page_locks

        self._cupy = cupy
        self._backend = backend
        self._page_locks = cupy_page_locks(backend.device) if page_lock else None
        self._known_direct = _KnownDirect()
        runtime = cupy.cuda.runtime
        self._memcpy = runtime.memcpyAsync
        self._event_record = runtime.eventRecord
        self._stream_wait_event = runtime.streamWaitEvent
        self._event_synchronize = runtime.eventSynchronize
        self._to_device = runtime.memcpyHostToDevice
        self._to_host = runtime.memcpyDeviceToHost
        self._on_device = runtime.memcpyDeviceToDevice
        # Page-locked host memory: the copy engines read and write it directly.
        self._pinned = runtime.memoryTypeHost

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        return self._cupy.cuda.Device(self._backend.device)  # type: ignore[no-any-return]

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        count = math.prod(shape)
        # CuPy's pinned-memory pool caches the block when the array dies, so
        # repeated runs do not pay cudaHostAlloc again.
        memory = self._cupy.cuda.alloc_pinned_memory(max(1, count * dtype.itemsize))
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)

    def is_direct(self, array: np.ndarray) -> bool:
        """Whether the copies can use ``array`` as it is: page-locked now, by anyone."""
        if array.nbytes == 0 or not array.flags.c_contiguous:
            return False
        attributes = self._cupy.cuda.runtime.pointerGetAttributes(array.ctypes.data)
        return bool(int(attributes.type) == self._pinned)

    def make_direct(self, array: np.ndarray) -> bool:
        if self.is_direct(array):
            return True
        if self._page_locks is None or not array.flags.c_contiguous:
            return False
        return self._page_locks.make_direct(array)

    def direct_address(self, array: np.ndarray, holds: list[Any]) -> int | None:
        unlocks = live_unlocks()  # read before anything below: see the last check
        known = self._known_direct.get(array, unlocks)
        if known is not None:
            address, locked = known
            if locked is None:
                return address  # CuPy's pinned memory (or a caller's lock): nothing to hold
            if locked.hold():
                holds.append(locked)
                return address
            # Being unlocked, or unlocked since: asked again below.
        # Held first where this process locked it in place (a held array stays
        # locked), so that what make_direct says stays true while it is used.
        usable, locked = _page_lock.hold(array)
        if usable and locked is None:
            if not self.make_direct(array):
                return None
            usable, locked = _page_lock.hold(array)  # locked just now, perhaps
        if not usable or (locked is None and live_unlocks() != unlocks):
            # Being unlocked; or an array was unlocked meanwhile, perhaps this
            # one while the driver was asked about it: staged this time.
            return None
        if locked is not None:
            holds.append(locked)
        address = array.ctypes.data
        self._known_direct.put(array, (address, locked), unlocks)
        return address

    def release(self, holds: list[Any]) -> None:
        _page_lock.release(holds)

    def device_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return self._cupy.empty(shape, dtype)  # within on_device()

    @contextlib.contextmanager
    def graph_memory(self) -> Iterator[Any]:
        _gather_kernel.ready(self._backend.device)  # no module may be loaded in a capture
        # A graph replays the addresses it captured: nothing it allocated may
        # go back to CuPy's shared pool, where other work would reuse it.
        memory = self._cupy.cuda.MemoryPool()
        try:
            with self._cupy.cuda.using_allocator(memory.malloc):
                yield memory
        except BaseException:
            memory.free_all_blocks()
            raise

    # The runtime's own calls on raw handles: per chunk these are the host's
    # whole cost next to the copies, as in a loop written by hand.
    def record(self, event: PooledEvent, lease: StreamLease) -> None:
        self._event_record(event._handle.ptr, stream_of(lease).ptr)

    def wait(self, lease: StreamLease, event: PooledEvent) -> None:
        self._stream_wait_event(stream_of(lease).ptr, event._handle.ptr, 0)

    def synchronize(self, event: PooledEvent) -> None:
        self._event_synchronize(event._handle.ptr)

    def copy_in(
        self, lease: StreamLease, dst: Any, src: np.ndarray, src_ptr: int, state: RunState
    ) -> None:
        ptr = stream_of(lease).ptr
        self._memcpy(dst.data.ptr, src_ptr, src.nbytes, self._to_device, ptr)

    def compute(
        self,
        lease: StreamLease,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        results: Sequence[Pending],
        state: RunState,
    ) -> None:
        ndarray = self._cupy.ndarray
        token = self._backend.enter(stream_of(lease))
        try:
            for x, result in zip(chunks, results, strict=True):
                y = fn(x)
                if type(y) is not ndarray or not y.flags.c_contiguous:
                    y = self._contiguous(y)
                result.value = y
        finally:
            self._backend.exit(token)

    def _contiguous(self, y: Any) -> Any:
        """fn's result as a C-contiguous ``cupy.ndarray``, or the error that says why not."""
        cupy = self._cupy
        if isinstance(y, np.ndarray) or not (
            isinstance(y, cupy.ndarray)
            or hasattr(y, "__cuda_array_interface__")
            or hasattr(y, "__dlpack__")
        ):
            raise TypeError(
                f"fn returned {type(y).__name__}; on the cupy backend fn must return a "
                "device array (a cupy.ndarray, or an array with __cuda_array_interface__ "
                "or __dlpack__)"
            )
        # Zero-copy for torch and Numba results; a copy on this stream only
        # when the result is not contiguous.
        return cupy.ascontiguousarray(cupy.asarray(y))

    def gather(
        self,
        lease: StreamLease,
        results: Sequence[Pending],
        into: Any,
        chunks: Sequence[tuple[int, int]],
        start: int,
        check: Check,
        state: RunState,
    ) -> None:
        values = []
        for result, (first, last) in zip(results, chunks, strict=True):
            check(result.value, first, last)
            values.append(result.value)
        stream = stream_of(lease)
        # Addresses by arithmetic: CuPy slicing is slow.
        base, row_bytes = into.data.ptr, into.strides[0]
        # A lease's results of a group, all of one size at evenly spaced rows
        # (the run's last chunk may be shorter), go in one kernel launch: a
        # copy each costs the host as much as the launch. The rest, or all
        # where the kernel cannot be compiled, are copied one at a time.
        batch = 0
        if len(values) > 1 and _gather_kernel.ready(self._backend.device):
            batch = _gather_kernel.batch_length(
                [y.nbytes for y in values],
                [first for first, _ in chunks],
                [y.data.device_id for y in values],  # a result on another device: copied
            )
            if values[0].data.device_id != self._backend.device or batch < 2:
                batch = 0
        if batch:
            dst = base + (chunks[0][0] - start) * row_bytes
            stride = (chunks[1][0] - chunks[0][0]) * row_bytes
            sources = [y.data.ptr for y in values[:batch]]
            _gather_kernel.gather(dst, stride, sources, values[0].nbytes, stream)
        for y, (first, _) in zip(values[batch:], chunks[batch:], strict=True):
            dst = base + (first - start) * row_bytes
            self._memcpy(dst, y.data.ptr, y.nbytes, self._on_device, stream.ptr)

    def copy_out(
        self, lease: StreamLease, result: Pending, destination: Destination, state: RunState
    ) -> None:
        y = result.value
        _, dst_ptr = destination(y)
        ptr = stream_of(lease).ptr
        self._memcpy(dst_ptr, y.data.ptr, y.nbytes, self._to_host, ptr)


class HostEngine:
    """numpy buffers; every stage is a host function on the lease's stream."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        return np.empty(shape, dtype)

    def make_direct(self, array: np.ndarray) -> bool:
        return True  # host "copies" read any numpy array

    def direct_address(self, array: np.ndarray, holds: list[Any]) -> int | None:
        return int(array.ctypes.data)

    def release(self, holds: list[Any]) -> None:
        holds.clear()  # numpy memory: nothing is ever held

    def device_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return np.empty(shape, dtype)

    def graph_memory(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # numpy buffers live as long as the graph holds them

    def record(self, event: PooledEvent, lease: StreamLease) -> None:
        self._backend.record(event._handle, stream_of(lease))

    def wait(self, lease: StreamLease, event: PooledEvent) -> None:
        self._backend.wait_event(stream_of(lease), event._handle)

    def synchronize(self, event: PooledEvent) -> None:
        self._backend.synchronize_event(event._handle)

    @staticmethod
    def _queue(lease: StreamLease, state: RunState, task: Callable[[], None]) -> None:
        def guarded() -> None:
            if state.error is not None:
                return  # an earlier stage failed: nothing of this run is worth doing
            try:
                task()
            except BaseException as exc:  # handed to the run's thread by RunState
                state.fail(exc)

        lease.launch_host_func(guarded)

    def copy_in(
        self, lease: StreamLease, dst: Any, src: np.ndarray, src_ptr: int, state: RunState
    ) -> None:
        self._queue(lease, state, lambda: np.copyto(dst, src))

    def compute(
        self,
        lease: StreamLease,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        results: Sequence[Pending],
        state: RunState,
    ) -> None:
        handle = stream_of(lease)
        backend = self._backend

        def task() -> None:
            token = backend.enter(handle)  # fn sees its stream as current, as on a GPU
            try:
                for x, result in zip(chunks, results, strict=True):
                    y = fn(x)
                    if not isinstance(y, np.ndarray):
                        raise TypeError(
                            f"fn returned {type(y).__name__}; on the host backend fn must "
                            "return a numpy.ndarray"
                        )
                    result.value = y
            finally:
                backend.exit(token)

        self._queue(lease, state, task)

    def gather(
        self,
        lease: StreamLease,
        results: Sequence[Pending],
        into: Any,
        chunks: Sequence[tuple[int, int]],
        start: int,
        check: Check,
        state: RunState,
    ) -> None:
        def task() -> None:
            for result, (first, last) in zip(results, chunks, strict=True):
                check(result.value, first, last)
                np.copyto(into[first - start : last - start], result.value)

        self._queue(lease, state, task)

    def copy_out(
        self, lease: StreamLease, result: Pending, destination: Destination, state: RunState
    ) -> None:
        def task() -> None:
            y = result.value
            np.copyto(destination(y)[0], y)

        self._queue(lease, state, task)
