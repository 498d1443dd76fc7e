"""A pipeline engine that runs on the host backend and times each stage on a ``DeviceModel``.

``Pipeline`` decides which lease each chunk's copy-in, compute and copy-out
goes to, in which order, and when the host waits before reusing a buffer; the
engine only carries the stages out. This one hands each stage both to the
host engine (numpy on the host backend's streams, so the result is real and
can be checked against one stream's) and to a device model, on the lease's
stream, so the schedule the pool produces is timed as a GPU would run it.

The model learns what a GPU would learn from events, from the data itself: a
kernel waits for the copy that filled its input buffer, a copy-out for the
kernel whose result it copies, and a copy-in into a buffer waits (on the host)
for the copy-out of the chunk that last used that buffer, as the pipeline
retires a buffer before refilling it. Sizes are scaled: the host moves small
arrays, the model times them as ``mib_per_byte`` times as many MiB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._pipeline_engines import Check, Destination, HostEngine, Pending, RunState
from .model import H100, DeviceModel, DeviceParams, Interval, Op

if TYPE_CHECKING:
    from .._backends import Backend
    from .._events import PooledEvent
    from .._lease import StreamLease

__all__ = ["ModelEngine"]


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns ``array``'s memory (a buffer, not one of its views)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class ModelEngine:
    """``HostEngine``'s work, each stage also queued on a ``DeviceModel``.

    Args:
        backend: The host backend of the pipeline's pool.
        mib_per_byte: Modelled MiB per byte the host really moves.
        kernel_ms: Modelled kernel time per chunk; None: the device's
            ``compute_ms_per_mib`` times the chunk's modelled size.
        params: The modelled device.

    Not thread-safe: time one pipeline call at a time (``timed``).
    """

    def __init__(
        self,
        backend: Backend,
        mib_per_byte: float,
        kernel_ms: float | None = None,
        params: DeviceParams = H100,
    ) -> None:
        self._host = HostEngine(backend)
        self._mib_per_byte = mib_per_byte
        self._kernel_ms = kernel_ms
        self._params = params
        self.model = DeviceModel(params)
        self._filled_by: dict[int, Op] = {}  # buffer -> the copy-in that filled it
        self._results: dict[int, tuple[Op, np.ndarray, float]] = {}  # Pending -> kernel
        self._emptied_by: dict[int, Op] = {}  # buffer -> copy-out of its last chunk
        # group buffer -> (kernel, its input buffer) of each result gathered into it
        self._gathered: dict[int, list[tuple[Op, np.ndarray]]] = {}

    def timed(self, run: Callable[[], object]) -> tuple[float, list[Interval]]:
        """Run ``run()`` on a fresh model: (modelled ms until all its work is done, intervals)."""
        self.model = DeviceModel(self._params)
        self._filled_by.clear()
        self._results.clear()
        self._emptied_by.clear()
        self._gathered.clear()
        run()
        return self.model.finish(), self.model.intervals()

    # -- buffers: the host engine's ------------------------------------------

    def on_device(self) -> contextlib.AbstractContextManager[Any]:
        return self._host.on_device()

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        return self._host.host_empty(shape, dtype)

    def make_direct(self, array: np.ndarray) -> bool:
        return self._host.make_direct(array)

    def direct_address(self, array: np.ndarray, holds: list[Any]) -> int | None:
        return self._host.direct_address(array, holds)

    def release(self, holds: list[Any]) -> None:
        self._host.release(holds)

    def device_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any:
        return self._host.device_empty(shape, dtype)

    def graph_memory(self) -> contextlib.AbstractContextManager[Any]:
        return self._host.graph_memory()

    # -- ordering: the host engine's (the model orders by the data) ----------

    def record(self, event: PooledEvent, lease: StreamLease) -> None:
        self._host.record(event, lease)

    def wait(self, lease: StreamLease, event: PooledEvent) -> None:
        self._host.wait(lease, event)

    def synchronize(self, event: PooledEvent) -> None:
        self._host.synchronize(event)

    # -- stages ---------------------------------------------------------------

    def copy_in(
        self, lease: StreamLease, dst: Any, src: np.ndarray, src_ptr: int, state: RunState
    ) -> None:
        buffer = id(_root(dst))
        previous = self._emptied_by.pop(buffer, None)
        if previous is not None:
            self.model.wait(previous)
        mib = src.nbytes * self._mib_per_byte
        self._filled_by[buffer] = self.model.copy(lease.stream.stream_id, "h2d", mib, "copy-in")
        self._host.copy_in(lease, dst, src, src_ptr, state)

    def compute(
        self,
        lease: StreamLease,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        results: Sequence[Pending],
        state: RunState,
    ) -> None:
        stream = lease.stream
        for x, result in zip(chunks, results, strict=True):
            buffer = _root(x)
            source = self._filled_by.get(id(buffer))
            mib = x.nbytes * self._mib_per_byte
            kernel = self.model.kernel(
                stream.stream_id,
                # The transform fills every SM for its whole time, as on a GPU.
                blocks=self._params.sms,
                block_ms=self._kernel_ms or mib * self._params.compute_ms_per_mib,
                stage="compute",
                priority=stream.priority,
                after=() if source is None else (source,),
            )
            self._results[id(result)] = (kernel, buffer, mib)
        self._host.compute(lease, fn, chunks, results, state)

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
        # Timed as free: a device-to-device copy is small next to the PCIe copies.
        for result in results:
            made = self._results.pop(id(result), None)
            if made is not None:
                kernel, buffer, _ = made
                self._gathered.setdefault(id(_root(into)), []).append((kernel, buffer))
        self._host.gather(lease, results, into, chunks, start, check, state)

    def copy_out(
        self, lease: StreamLease, result: Pending, destination: Destination, state: RunState
    ) -> None:
        made = self._results.pop(id(result), None)
        if made is None:  # a device buffer copied out as it is (a group's, gathered)
            mib = result.value.nbytes * self._mib_per_byte
            gathered = self._gathered.pop(id(_root(result.value)), [])
            after = tuple(kernel for kernel, _ in gathered)
            op = self.model.copy(lease.stream.stream_id, "d2h", mib, "copy-out", after=after)
            for _, buffer in gathered:  # as below: the inputs are free once this is done
                self._emptied_by[id(buffer)] = op
        else:
            kernel, buffer, mib = made
            op = self.model.copy(lease.stream.stream_id, "d2h", mib, "copy-out", after=(kernel,))
            self._emptied_by[id(buffer)] = op
        self._host.copy_out(lease, result, destination, state)
