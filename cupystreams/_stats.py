"""Frozen statistics snapshots, safe to keep and read from any thread."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EventPoolStats", "KindStats", "PoolStats", "StreamStats"]


@dataclass(frozen=True)
class StreamStats:
    """What one pooled stream has done since the pool was made.

    Attributes:
        stream_id: The stream's index in its pool.
        kind: ``"compute"``, ``"comm"`` or ``"high_priority"``.
        priority: The CUDA priority the stream was created with.
        acquisitions: How many leases it has served.
        total_active_ms: Host time it spent leased, over all leases.
        affinity_hits: Keyed acquires that got this stream because the key
            used it last.
        waits: Stream-ordered waits enqueued on it (``wait``, ``wait_event``
            and the wait a moved affinity key makes).
    """

    stream_id: int
    kind: str
    priority: int
    acquisitions: int
    total_active_ms: float
    affinity_hits: int
    waits: int

    def avg_active_time_ms(self) -> float:
        """Mean host time per lease in milliseconds (0.0 before any lease)."""
        return self.total_active_ms / self.acquisitions if self.acquisitions else 0.0


@dataclass(frozen=True)
class KindStats:
    """Occupancy of one kind of stream at the moment of the snapshot."""

    capacity: int
    leased: int
    idle: int
    waiting: int


@dataclass(frozen=True)
class EventPoolStats:
    """Figures of an ``EventPool``.

    Attributes:
        created: Events created since the pool was made.
        idle: Events kept for reuse right now.
        in_use: Events handed out and not yet released (an event dropped
            without release stays counted here: a leak shows).
        max_size: Bound on the idle events kept.
        timing: Whether the pool's events record timestamps.
    """

    created: int
    idle: int
    in_use: int
    max_size: int
    timing: bool


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a ``CudaStreamPool``.

    Attributes:
        compute: Occupancy of the compute streams.
        comm: Occupancy of the communication streams.
        high_priority: Occupancy of the high-priority streams.
        acquisitions: Leases handed out, all kinds.
        timeouts: Blocking acquires that raised ``PoolTimeoutError``.
        exhaustions: Non-blocking acquires that raised ``PoolExhaustedError``.
        events: The event pool's figures. Its ``in_use`` includes
            ``key_events``.
        key_events: Events the pool holds for affinity keys: one per key
            whose stream went to another holder, marking where the key's
            work ended, until the key's next lease waits on it.
        closed: Whether the pool was closed.
    """

    compute: KindStats
    comm: KindStats
    high_priority: KindStats
    acquisitions: int
    timeouts: int
    exhaustions: int
    events: EventPoolStats
    key_events: int
    closed: bool

    @property
    def leased(self) -> int:
        """Leases live right now, all kinds."""
        return self.compute.leased + self.comm.leased + self.high_priority.leased

    @property
    def waiting(self) -> int:
        """Threads blocked in acquire right now, all kinds."""
        return self.compute.waiting + self.comm.waiting + self.high_priority.waiting
