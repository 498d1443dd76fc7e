"""Stream capture on the host backend: the rules of CUDA's, on host threads.

A capture begins on one stream, its origin. From then on a task submitted to a
capturing stream is recorded, not run. The rest follows CUDA's stream
capture, so that code tested here behaves the same on a GPU:

* An event recorded on a capturing stream marks the capture's position on
  that stream (``CapturePoint``); a stream that waits on it joins the capture,
  its next task ordered after that position (cross-stream capture).
* A capturing stream that waits on an event recorded outside its capture, or
  that is synchronized or queried, is an error that invalidates the capture,
  as CUDA's ``cudaErrorStreamCaptureIsolation`` / ``...Unsupported`` do.
* The capture ends on its origin only. Every stream that joined must have
  been joined back first: the origin waited on an event recorded on it after
  its last task (CUDA's ``cudaErrorStreamCaptureUnjoined`` otherwise). Either
  way, ending takes every stream of the capture out of capture mode.
* The graph replays the recorded tasks in the order they were recorded,
  which respects every dependency, as one task on the stream it is launched
  on: the captured schedule again, run serially, not a concurrent graph.

Locking: ``HostCapture._lock`` guards its ``_tasks``, ``_after``, ``_tails``,
``_ended`` and ``_invalid``. Each ``HostStream``'s own lock guards its
``capture`` field; a stream's lock is taken before a capture's, never the
other way round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._host import HostStream

__all__ = ["CapturePoint", "HostCapture", "HostGraph"]

_Task = Callable[[], None]


class CapturePoint:
    """What an event recorded on a capturing stream holds: the capture, and the
    tasks that a stream waiting on it comes after."""

    __slots__ = ("capture", "tasks")

    def __init__(self, capture: HostCapture, tasks: frozenset[int]) -> None:
        self.capture = capture
        self.tasks = tasks


class HostGraph:
    """The tasks of an ended capture, replayed in recorded order by ``run``."""

    __slots__ = ("tasks",)

    def __init__(self, tasks: tuple[_Task, ...]) -> None:
        self.tasks = tasks

    def run(self) -> None:
        for task in self.tasks:
            task()

    def __repr__(self) -> str:
        return f"<HostGraph of {len(self.tasks)} tasks>"


class HostCapture:
    """One capture sequence: the tasks recorded from its streams and their order."""

    def __init__(self, origin: HostStream) -> None:
        self.origin = origin
        self._lock = threading.Lock()
        self._tasks: list[_Task] = []
        self._after: list[frozenset[int]] = []  # per task: the tasks it comes after
        # Each stream's last tasks: what its next task comes after.
        self._tails: dict[HostStream, frozenset[int]] = {origin: frozenset()}
        self._ended = False
        self._invalid: str | None = None

    def record_task(self, stream: HostStream, task: _Task) -> bool:
        """Record ``task`` as ``stream``'s next one (the stream's lock is held).

        Returns False once the capture has ended: the caller runs the task instead.
        """
        with self._lock:
            if self._ended:
                return False
            index = len(self._tasks)
            self._tasks.append(task)
            self._after.append(self._tails[stream])
            self._tails[stream] = frozenset((index,))
            return True

    def point(self, stream: HostStream) -> CapturePoint:
        """Where ``stream`` is in the capture now (an event recorded there)."""
        with self._lock:
            return CapturePoint(self, self._tails[stream])

    def join_locked(self, stream: HostStream, after: frozenset[int]) -> None:
        """``stream`` (whose lock is held) waits for ``after``: joins, or joins back."""
        with self._lock:
            if self._ended:
                raise RuntimeError(
                    "the event was recorded in a capture that has ended; record it again"
                )
            self._tails[stream] = self._tails.get(stream, frozenset()) | after

    def ended(self) -> bool:
        with self._lock:
            return self._ended

    def invalidate(self, why: str) -> None:
        with self._lock:
            if self._invalid is None:
                self._invalid = why

    def finish(self) -> tuple[list[HostStream], HostGraph | str]:
        """End the capture: its streams, and its graph or why there is none."""
        with self._lock:
            self._ended = True
            streams = list(self._tails)
            if self._invalid is not None:
                return streams, f"the capture was invalidated: {self._invalid}"
            done = _closure(self._tails[self.origin], self._after)
            unjoined = [s for s in streams if s is not self.origin and not self._tails[s] <= done]
            if unjoined:
                return streams, (
                    f"{len(unjoined)} stream(s) joined the capture and were not joined back "
                    "to its origin before it ended (CUDA: cudaErrorStreamCaptureUnjoined): "
                    + ", ".join(map(repr, unjoined))
                )
            return streams, HostGraph(tuple(self._tasks))


def _closure(tasks: Iterable[int], after: list[frozenset[int]]) -> set[int]:
    """``tasks`` and every task they come after."""
    seen: set[int] = set()
    todo = list(tasks)
    while todo:
        task = todo.pop()
        if task not in seen:
            seen.add(task)
            todo.extend(after[task])
    return seen
