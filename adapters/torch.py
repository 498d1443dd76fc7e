"""PyTorch adapter: a lease as torch's stream, protected tensors, ordering both ways.

``use(lease)`` makes one pooled stream current for torch *and* CuPy (and makes
its device current), so CuPy and torch code in one block run in stream order
with no hand-off cost::

    from cupystreams.adapters import torch as cst_torch

    with pool.acquire_compute() as lease, cst_torch.use(lease):
        t = torch.from_dlpack(cupy_array)   # torch and CuPy share the stream
        y = (t @ t).relu()
    cst_torch.protect(lease, t, y)          # before t and y may be freed

Rules:

* Work on a lease is not ordered against torch's other streams, its default
  stream included (pool streams are non-blocking). Cross with
  ``lease_waits_for_torch`` (lease after torch) and ``torch_waits_for_lease``
  (torch after lease); both queue an event wait on the GPU and never block the
  host.
* A tensor allocated outside the lease's stream and used on the lease must be
  passed to ``protect`` before it is freed, or torch's caching allocator may
  hand its memory to a new tensor while the lease still reads or writes it.
  Tensors allocated inside ``use(lease)`` belong to the lease's stream and
  need nothing.

Stream arguments are anything the core accepts: a lease, a ``PooledStream``, a
``cupy.cuda.Stream``, an object with ``__cuda_stream__`` or a raw pointer (0 is
the legacy default stream, which is torch's default stream). The torch stream
of a pooled stream is built once and cached for the pool's life.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

try:
    import torch
except ImportError as exc:
    raise ImportError(
        "cupystreams.adapters.torch needs PyTorch, which is not installed; "
        "install it with `pip install cupystreams[torch]`"
    ) from exc


from cupystreams import StreamLease
from cupystreams._backends._cupy import make_current, restore_current

from ._streams import StreamCache, device_of, order, stream_handle

__all__ = [
    "as_torch_stream",
    "lease_waits_for_torch",
    "protect",
    "torch_waits_for_lease",
    "use",
]


def _public_get_stream(device: int) -> tuple[int, int, int]:
    stream = torch.cuda.current_stream(device)
    return (stream.stream_id, stream.device_index, stream.device_type)


def _public_set_stream(stream_id: int, device_index: int, device_type: int) -> None:
    torch.cuda.set_stream(
        torch.cuda.Stream(stream_id=stream_id, device_index=device_index, device_type=device_type)
    )


# torch.cuda.current_stream()/set_stream() build a Stream object per call and
# cost several microseconds; the bindings under them take and return three
# ints. The public functions are the fallback for a torch without them.
_get_torch_stream: Callable[[int], tuple[int, int, int]] = getattr(
    torch._C, "_cuda_getCurrentStream", _public_get_stream
)
_set_torch_stream: Callable[[int, int, int], None] = getattr(
    torch._C, "_cuda_setStream", _public_set_stream
)


class _TorchStream:
    """The torch view of one CuPy stream, built once.

    It must not refer to the CuPy stream, which is its key in the cache.
    """

    __slots__ = ("device", "ids", "stream")

    def __init__(self, handle: Any) -> None:
        self.device = device_of(handle)
        ptr = int(handle.ptr)
        from_external = getattr(torch.cuda, "get_stream_from_external", None)
        if from_external is not None:
            self.stream: Any = from_external(ptr, self.device)
        else:  # torch < 2.2
            self.stream = torch.cuda.ExternalStream(ptr, device=self.device)
        self.ids = (self.stream.stream_id, self.stream.device_index, self.stream.device_type)


_cache: StreamCache[_TorchStream] = StreamCache(_TorchStream)


def _torch_view(stream: object, argument: str = "stream") -> _TorchStream:
    handle, long_lived = stream_handle(stream, argument)
    return _cache.get(handle, long_lived)


def as_torch_stream(stream: object) -> Any:
    """The ``torch.cuda.Stream`` for ``stream`` (a lease or any stream argument).

    Built with ``torch.cuda.get_stream_from_external`` once per pooled stream
    and cached for the pool's life, so later calls cost a dictionary lookup.
    The torch stream does not own the CUDA stream: the pool does.

    Raises:
        TypeError: Not a stream, or a lease of a pool on the host backend.
        LeaseError, PoolClosedError: A released lease or a closed pool.
    """
    return _torch_view(stream).stream


class _Use:
    """``with use(stream):`` — see ``use``. One ``with`` per object."""

    __slots__ = ("_cupy_stream", "_saved", "_view")

    def __init__(self, cupy_stream: Any, view: _TorchStream) -> None:
        self._cupy_stream = cupy_stream
        self._view = view
        self._saved: tuple[tuple[int, Any], tuple[int, int, int]] | None = None

    def __enter__(self) -> Any:
        if self._saved is not None:
            raise RuntimeError("this use() block is already entered; call use() again to nest")
        view = self._view
        cupy_saved = make_current(view.device, self._cupy_stream)
        self._saved = (cupy_saved, _get_torch_stream(view.device))
        _set_torch_stream(*view.ids)
        return view.stream

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        cupy_saved, torch_saved = saved
        _set_torch_stream(*torch_saved)
        restore_current(self._view.device, cupy_saved)


def use(stream: object) -> _Use:
    """Make ``stream`` current for torch and CuPy, and its device current, in a ``with`` block.

    ``with use(lease) as torch_stream:`` runs torch ops and CuPy ops of the
    block on the lease's stream. On exit torch's and CuPy's current streams on
    that device, and the current device, are restored; the lease is *not*
    released (leave its own ``with`` for that). Per thread, like both
    frameworks' current streams. Entering and leaving cost 2-5 µs on an H100
    host, several times less than ``with torch.cuda.stream(...)``: the torch stream is
    cached, and torch's current stream is switched through the three ints
    that identify it, without building ``torch.cuda.Stream`` objects.

    Args:
        stream: A lease or any stream argument (see the module docstring).
    """
    if type(stream) is StreamLease:  # the hot path: a lease whose torch stream is built
        handle = stream.cupy_stream
        view = _cache.peek(handle)
        if view is not None:
            return _Use(handle, view)
    handle, long_lived = stream_handle(stream, "stream")
    return _Use(handle, _cache.get(handle, long_lived))


def protect(stream: object, *tensors: Any) -> None:
    """Keep torch from reusing the tensors' memory until ``stream``'s work on them is done.

    Call it for every tensor used on a lease that was not allocated on the
    lease's stream, before the tensor may be freed. It uses
    ``Tensor.record_stream``: when the tensor is later freed, torch's caching
    allocator records an event on the lease's stream at that moment and hands
    the block to a new tensor only after that event has completed. This was
    chosen over an event-based keep-alive (hold the tensor until an event
    recorded now completes) because it covers all work queued on the lease up
    to the free, including work queued after this call; it needs no polling,
    no host callback (which could not free CUDA memory) and no Python
    reference, so the tensor's own lifetime is unchanged. The cost: the block
    can stay unavailable a little longer than needed, while unrelated later
    work on the lease's stream runs.

    Raises:
        TypeError: A tensor is not a CUDA ``torch.Tensor``.
    """
    torch_stream = _torch_view(stream).stream
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
            where = f" on {tensor.device}" if isinstance(tensor, torch.Tensor) else ""
            kind = type(tensor).__name__
            raise TypeError(f"tensors[{index}] is a {kind}{where}; protect() takes CUDA tensors")
        tensor.record_stream(torch_stream)


def _public_current_ptr(device: int) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


_current_torch_ptr: Callable[[int], int] = getattr(
    torch._C, "_cuda_getCurrentRawStream", _public_current_ptr
)


def _torch_ptr(torch_stream: object, device: int) -> int:
    if torch_stream is None:
        return int(_current_torch_ptr(device))
    if isinstance(torch_stream, torch.cuda.Stream):
        return int(torch_stream.cuda_stream)
    handle, _ = stream_handle(torch_stream, "torch_stream")
    return int(handle.ptr)


def lease_waits_for_torch(stream: object, torch_stream: object = None) -> None:
    """Make later work on ``stream`` wait for the work queued so far on torch's stream.

    Use it before a lease consumes what torch produced outside the lease.

    Args:
        stream: The lease (or any stream argument) that must wait.
        torch_stream: The producer: torch's current stream on the lease's
            device when None (the default stream, pointer 0, unless a
            ``torch.cuda.stream`` block changed it), or a ``torch.cuda.Stream``
            or any stream argument.
    """
    handle, _ = stream_handle(stream, "stream")
    device = device_of(handle)
    order(waiter=int(handle.ptr), producer=_torch_ptr(torch_stream, device), device=device)


def torch_waits_for_lease(stream: object, torch_stream: object = None) -> None:
    """Make later work on torch's stream wait for the work queued so far on ``stream``.

    Use it before torch code outside the lease consumes what the lease produced.

    Args:
        stream: The lease (or any stream argument) whose work comes first.
        torch_stream: The consumer: torch's current stream on the lease's
            device when None, or a ``torch.cuda.Stream`` or any stream argument.
    """
    handle, _ = stream_handle(stream, "stream")
    device = device_of(handle)
    order(waiter=_torch_ptr(torch_stream, device), producer=int(handle.ptr), device=device)
