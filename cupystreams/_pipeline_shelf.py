"""The buffers a ``Pipeline`` keeps between runs, for its next run of the same shapes.

A loop written by hand allocates its device buffers once and reuses them run
after run. A pipeline that allocated them again for every run would pay for
that before its first copy and after its last, while the device waits: so a
run that ends well leaves its copy groups' buffers on the pipeline's shelf,
and the next run whose groups have the same shapes takes them back.

What is kept is memory only (device input and gather buffers, page-locked
staging buffers, and the views ``fn`` gets), never a lease or an event: a
pipeline between runs holds nothing another user of the pool waits for.
Every buffer on the shelf is idle: a run shelves a group's buffers only once
the group is back on the host.

Locking: ``Shelf._lock`` guards ``_kept``; it is a leaf lock, and no CUDA
call or user code runs under it.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np

__all__ = ["InputShape", "OutputShape", "Shelf", "SlotBuffers"]


class InputShape(NamedTuple):
    """What the input side of a copy group's buffers depends on."""

    rows: int  # rows of a group
    step: int  # rows of a chunk (the views fn gets)
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]


class OutputShape(NamedTuple):
    """What the output side of a copy group's buffers depends on."""

    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]


class SlotBuffers(NamedTuple):
    """One copy group's buffers, off a run: see ``_Slot`` in ``pipeline``."""

    input_shape: InputShape
    output_shape: OutputShape | None  # None: no output side kept
    x: Any  # device input buffer
    chunks: list[Any]  # views of x, one per chunk
    stage_in: np.ndarray | None
    stage_in_ptr: int
    gathered: Any  # device buffer a group's results are gathered into
    stage_out: np.ndarray | None
    stage_out_ptr: int


class Shelf:
    """At most ``most`` copy groups' buffers, newest last."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._lock = threading.Lock()
        self._kept: list[SlotBuffers] = []

    def __len__(self) -> int:
        return len(self._kept)

    def take(
        self, input_shape: InputShape, output_shape: OutputShape | None, count: int
    ) -> list[SlotBuffers]:
        """Up to ``count`` groups' buffers for a run of these shapes, newest first.

        Buffers of other input shapes stay for a run of theirs; an output side
        of another shape (or any, when the run's output is not known yet) is
        left behind.
        """
        fits: list[SlotBuffers] = []
        others: list[SlotBuffers] = []
        with self._lock:
            for kept in reversed(self._kept):
                taken = len(fits) < count and kept.input_shape == input_shape
                (fits if taken else others).append(kept)
            self._kept = others[::-1]
        return [
            kept
            if kept.output_shape == output_shape
            else kept._replace(output_shape=None, gathered=None, stage_out=None, stage_out_ptr=0)
            for kept in fits
        ]

    def put(self, buffers: list[SlotBuffers]) -> None:
        """Shelve idle buffers; beyond ``most``, the oldest go back to their allocators."""
        with self._lock:
            self._kept += buffers
            excess = max(0, len(self._kept) - self.most)
            dropped, self._kept = self._kept[:excess], self._kept[excess:]
        del dropped  # freed outside the lock

    def clear(self) -> None:
        """Let every kept buffer go back to its allocator."""
        with self._lock:
            dropped, self._kept = self._kept, []
        del dropped  # freed outside the lock
