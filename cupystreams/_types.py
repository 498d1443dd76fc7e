"""Small public enums and the protocol for objects that expose a CUDA stream."""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

__all__ = ["CudaStreamLike", "StreamKind", "StreamPriority", "StreamState"]


class StreamPriority(enum.Enum):
    """Symbolic stream priorities, resolved against the device at run time.

    ``NORMAL`` is CUDA's default, which is also the least priority; ``HIGH`` is
    the greatest priority the device offers. Where an API takes a priority it
    also takes a plain int inside ``pool.priority_range``.
    """

    NORMAL = "normal"
    HIGH = "high"


class StreamState(enum.Enum):
    """Where a pooled stream is in its life."""

    IDLE = "idle"
    LEASED = "leased"
    CLOSED = "closed"


class StreamKind(enum.Enum):
    """The three groups of streams a pool keeps, each with its own queue."""

    COMPUTE = "compute"
    COMM = "comm"
    HIGH_PRIORITY = "high_priority"


@runtime_checkable
class CudaStreamLike(Protocol):
    """Anything that speaks the ``__cuda_stream__`` protocol.

    The method returns ``(version, pointer)``; version 0 is the only one
    defined so far.
    """

    def __cuda_stream__(self) -> tuple[int, int]: ...
