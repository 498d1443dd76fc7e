"""A GPU's engines on a virtual clock: what the demo and bench show without a GPU.

Without a GPU there is no device to time: host threads standing in for copy
engines and SMs compete for the machine's few cores, and their times tell the
CPU's load, not what streams buy. ``DeviceModel`` instead schedules the work a
scene queues on modelled engines, in virtual milliseconds (a discrete-event
simulation): the same work gives the same schedule on any machine, every run.

The modelled device has
  * one copy engine each way (host to device, device to host), each running
    one copy at a time in the order the copies became ready; both share the
    link, so each is slower while the other is busy;
  * ``sms`` SMs running kernel blocks: when an SM frees up it takes the next
    block of the most urgent ready kernel (CUDA's priorities: the lower number
    first), among equal priorities of the kernel that became ready first. A
    running block is never preempted.

Streams keep CUDA's order: an operation becomes ready once the earlier work of
its stream and every operation it waits for (an event, on a GPU) are done, and
not before the host queued it. Work on different streams overlaps wherever it
uses different engines. The host side is modelled too: queuing costs
``launch_ms``, and ``wait`` blocks the host until an operation is done, so a
scene that waits before queuing more (as a pipeline retiring its buffers
does) is timed as it would be on a GPU.

Durations are modelled, never measured: ``DeviceParams`` holds the speeds,
taken from an H100's measured figures.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["H100", "DeviceModel", "DeviceParams", "Interval", "Op"]

_COPY_ENGINES = ("h2d", "d2h")
# Copies progress as fractions of MiB; a copy whose remainder is below this
# has finished (float rounding, not data).
_EPS = 1e-9


@dataclass(frozen=True)
class DeviceParams:
    """Modelled speeds of one GPU (milliseconds, MiB).

    Attributes:
        name: The GPU the figures come from, for labels.
        h2d_ms_per_mib: A host-to-device copy with the other direction idle.
        d2h_ms_per_mib: A device-to-host copy with the other direction idle.
        duplex_ms_per_mib: Either direction while both copy at once.
        compute_ms_per_mib: The pipeline's transform kernel on the whole device.
        sms: SMs, each running one block at a time.
        launch_ms: Host time to queue one operation.
    """

    name: str
    h2d_ms_per_mib: float
    d2h_ms_per_mib: float
    duplex_ms_per_mib: float
    compute_ms_per_mib: float
    sms: int
    launch_ms: float

    def copy_ms_per_mib(self, direction: str, both_busy: bool) -> float:
        """Time per MiB of a copy in ``direction`` (``"h2d"``/``"d2h"``) right now."""
        if both_busy:
            return self.duplex_ms_per_mib
        return self.h2d_ms_per_mib if direction == "h2d" else self.d2h_ms_per_mib


#: An H100 80GB (SXM), as measured by ``cupystreams bench`` on 2026-11-26 (the
#: pipeline table of BENCHMARKS.md, in that run): 16 chunks of 64 MiB
#: (1024 MiB) copied in alone in 20.6 ms, out alone in 20.0 ms, both ways at
#: once in 24.7 ms, transformed alone (4 multiply-adds per element, bound by
#: memory bandwidth) in 1.5 ms; 132 SMs. Queuing an operation costs a few µs
#: of host time on a GPU; 4 µs is an assumption, not a measured figure.
H100 = DeviceParams(
    name="H100",
    h2d_ms_per_mib=20.6 / 1024,
    d2h_ms_per_mib=20.0 / 1024,
    duplex_ms_per_mib=24.7 / 1024,
    compute_ms_per_mib=1.5 / 1024,
    sms=132,
    launch_ms=0.004,
)

#: What ``cupystreams demo`` and ``bench`` say in their first line on the host backend.
MODELLED = f"device time is modelled from {H100.name} figures, not measured"


class Op:
    """One queued operation: a copy, a kernel, or a mark (an event's position).

    ``ready_ms``, ``start_ms`` and ``end_ms`` are set as the model runs.
    """

    __slots__ = (
        "after",
        "amount",
        "blocks",
        "end_ms",
        "engine",
        "index",
        "left",
        "priority",
        "queued_ms",
        "ready_ms",
        "running",
        "stage",
        "start_ms",
        "stream",
    )

    def __init__(
        self,
        engine: str,
        stream: int,
        stage: str,
        amount: float,
        blocks: int = 0,
        priority: int = 0,
        after: Iterable[Op] = (),
    ) -> None:
        self.engine = engine  # "h2d", "d2h", "sm" or "mark"
        self.stream = stream
        self.stage = stage
        self.amount = amount  # MiB for a copy, ms per block for a kernel
        self.blocks = blocks
        self.priority = priority
        self.after = tuple(after)
        self.index = 0
        self.queued_ms = 0.0
        self.ready_ms: float | None = None
        self.start_ms: float | None = None
        self.end_ms: float | None = None
        self.left = amount if engine in _COPY_ENGINES else float(blocks)
        self.running = 0  # blocks on SMs now

    @property
    def done(self) -> bool:
        return self.end_ms is not None

    def __repr__(self) -> str:
        return (
            f"<Op {self.index} {self.stage} on stream {self.stream} "
            f"[{self.start_ms}, {self.end_ms}]>"
        )


@dataclass(frozen=True)
class Interval:
    """When one copy or kernel ran, in modelled ms since the model began."""

    stream: int
    stage: str
    engine: str
    ready_ms: float
    start_ms: float
    end_ms: float

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class DeviceModel:
    """Queue work on modelled streams from one host thread; read when it ran.

    Not thread-safe: one scene drives one model from one thread.
    """

    def __init__(self, params: DeviceParams = H100) -> None:
        self.params = params
        #: The host thread's clock: advanced by queuing, ``sleep`` and ``wait``.
        self.host_ms = 0.0
        self._now = 0.0  # the device's clock; never ahead of host_ms between calls
        self._ops: list[Op] = []
        self._pending: dict[int, collections.deque[Op]] = {}  # per stream, not yet ready
        self._released: dict[int, Op] = {}  # per stream, the latest op made ready
        self._ready: dict[str, list[Op]] = {"h2d": [], "d2h": [], "sm": []}
        self._copying: dict[str, Op | None] = dict.fromkeys(_COPY_ENGINES)
        self._blocks: list[tuple[float, Op, int]] = []  # (end, kernel, blocks) on SMs
        self._busy_sms = 0
        #: The most SMs ever busy at once (at most ``params.sms``).
        self.peak_sms = 0

    # -- the host queues work ---------------------------------------------

    def copy(
        self, stream: int, direction: str, mib: float, stage: str, after: Iterable[Op] = ()
    ) -> Op:
        """Queue a copy of ``mib`` MiB; ``direction`` is ``"h2d"`` or ``"d2h"``."""
        if direction not in _COPY_ENGINES:
            raise ValueError(f"direction={direction!r} is not one of {_COPY_ENGINES}")
        return self._queue(Op(direction, stream, stage, mib, after=after))

    def kernel(
        self,
        stream: int,
        blocks: int,
        block_ms: float,
        stage: str,
        priority: int = 0,
        after: Iterable[Op] = (),
    ) -> Op:
        """Queue a kernel of ``blocks`` blocks, each holding an SM for ``block_ms``."""
        if blocks < 1 or block_ms <= 0:
            raise ValueError(
                f"a kernel needs blocks >= 1 and block_ms > 0, not {blocks=}, {block_ms=}"
            )
        return self._queue(Op("sm", stream, stage, block_ms, blocks, priority, after))

    def mark(self, stream: int) -> Op:
        """Queue a mark: done as soon as the stream's earlier work is (an event record)."""
        return self._queue(Op("mark", stream, "mark", 0.0))

    def _queue(self, op: Op) -> Op:
        self.host_ms += self.params.launch_ms
        op.index = len(self._ops)
        op.queued_ms = self.host_ms
        self._ops.append(op)
        self._pending.setdefault(op.stream, collections.deque()).append(op)
        return op

    # -- the host waits ----------------------------------------------------

    def sleep(self, ms: float) -> None:
        """The host does something else for ``ms``."""
        self.host_ms += ms

    def wait(self, op: Op) -> None:
        """Block the host until ``op`` is done (an event's synchronize)."""
        self._run_until(lambda: op.done)
        assert op.end_ms is not None
        self.host_ms = max(self.host_ms, op.end_ms)

    def wait_stream(self, stream: int) -> None:
        """Block the host until everything queued on ``stream`` is done."""
        queued = self._pending.get(stream)
        last = queued[-1] if queued else self._released.get(stream)
        if last is not None:
            self.wait(last)

    def finish(self) -> float:
        """Block the host until all work is done; return the host's clock then."""
        for op in self._ops:
            self.wait(op)
        return self.host_ms

    def intervals(self) -> list[Interval]:
        """Every copy and kernel that ran, in queue order."""
        return [
            Interval(op.stream, op.stage, op.engine, op.ready_ms, op.start_ms, op.end_ms)
            for op in self._ops
            if op.engine != "mark"
            and op.ready_ms is not None
            and op.start_ms is not None
            and op.end_ms is not None
        ]

    # -- the device --------------------------------------------------------

    def _run_until(self, done: Callable[[], bool]) -> None:
        while True:
            self._release()
            if done():
                # Not dispatching at this instant yet: work the host queues
                # now competes with what is ready now, priorities deciding.
                return
            self._dispatch()
            later = self._next_event()
            if later is None:
                raise RuntimeError("the modelled device is idle but the awaited work is not done")
            self._advance(later)

    def _release(self) -> None:
        """Make ready every operation whose stream, waits and queuing allow it."""
        changed = True
        while changed:
            changed = False
            for stream, pending in self._pending.items():
                while pending:
                    op = pending[0]
                    before = self._released.get(stream)
                    if (
                        (before is not None and not before.done)
                        or op.queued_ms > self._now
                        or not all(dep.done for dep in op.after)
                    ):
                        break
                    pending.popleft()
                    self._released[stream] = op
                    op.ready_ms = self._now
                    if op.engine == "mark":
                        op.start_ms = op.end_ms = self._now
                        changed = True  # another stream may wait for this mark
                    else:
                        self._ready[op.engine].append(op)

    def _dispatch(self) -> None:
        for direction in _COPY_ENGINES:
            ready = self._ready[direction]
            if self._copying[direction] is None and ready:
                op = min(ready, key=lambda o: (o.ready_ms, o.index))
                ready.remove(op)
                op.start_ms = self._now
                self._copying[direction] = op
        kernels = self._ready["sm"]
        while kernels and self._busy_sms < self.params.sms:
            op = min(kernels, key=lambda o: (o.priority, o.ready_ms, o.index))
            blocks = min(self.params.sms - self._busy_sms, int(op.left))
            if op.start_ms is None:
                op.start_ms = self._now
            self._blocks.append((self._now + op.amount, op, blocks))
            op.left -= blocks
            op.running += blocks
            self._busy_sms += blocks
            if op.left == 0:
                kernels.remove(op)
        self.peak_sms = max(self.peak_sms, self._busy_sms)

    def _copy_ms_per_mib(self, direction: str) -> float:
        both = all(self._copying[d] is not None for d in _COPY_ENGINES)
        return self.params.copy_ms_per_mib(direction, both)

    def _next_event(self) -> float | None:
        times = [end for end, _, _ in self._blocks]
        for direction, op in self._copying.items():
            if op is not None:
                times.append(self._now + op.left * self._copy_ms_per_mib(direction))
        times.extend(
            pending[0].queued_ms
            for pending in self._pending.values()
            if pending and pending[0].queued_ms > self._now
        )
        return min(times, default=None)

    def _advance(self, to: float) -> None:
        elapsed = to - self._now
        rates = {d: self._copy_ms_per_mib(d) for d in _COPY_ENGINES}
        for direction, op in self._copying.items():
            if op is None:
                continue
            op.left -= elapsed / rates[direction]
            if op.left <= _EPS:
                op.left = 0.0
                op.end_ms = to
                self._copying[direction] = None
        running = []
        for end, op, blocks in self._blocks:
            if end > to:
                running.append((end, op, blocks))
                continue
            op.running -= blocks
            self._busy_sms -= blocks
            if op.left == 0 and op.running == 0:
                op.end_ms = to
        self._blocks = running
        self._now = to
