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
    output_shape: OutputShape | None  # what gathered and stage_out were made for
    x: Any  # device input buffer
    chunks: list[Any]  # views of x, one per chunk
    stage_in: np.ndarray | None
    stage_in_ptr: int
    gathered: Any  # device buffer a group's results are gathered into
    stage_out: np.ndarray | None
    stage_out_ptr: int


class Shelf:
    """Idle copy groups' buffers, newest last; a pipeline's runs bound them.

    The bound (``most``, the pipeline's ``max_in_flight``) is given at each
    call, so it follows the pipeline's. Kept groups and one run's groups
    together stay within it: a run that allocates groups of a new shape
    first lets the oldest kept ones go, so a run never adds a second run's
    worth to what is kept (runs on several threads each hold their own).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: list[SlotBuffers] = []

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, input_shape: InputShape, count: int, most: int) -> list[SlotBuffers]:
        """Up to ``count`` groups' buffers of ``input_shape`` for a run of ``count``
        groups (their output sides are checked by the run, which knows its output).

        Buffers of other input shapes stay for a run of theirs, as far as the
        ones the run allocates leave room under ``most``; the oldest go first.
        """
        fits: list[SlotBuffers] = []
        others: list[SlotBuffers] = []  # newest first
        with self._lock:
            for kept in reversed(self._kept):
                taken = len(fits) < count and kept.input_shape == input_shape
                (fits if taken else others).append(kept)
            room = max(0, most - count)
            dropped = others[room:]
            self._kept = others[:room][::-1]
        del dropped  # freed outside the lock
        return fits

    def put(self, buffers: list[SlotBuffers], most: int) -> None:
        """Shelve idle buffers; beyond ``most``, the oldest go back to their allocators."""
        with self._lock:
            self._kept += buffers
            excess = max(0, len(self._kept) - most)
            dropped, self._kept = self._kept[:excess], self._kept[excess:]
        del dropped  # freed outside the lock

    def clear(self) -> None:
        """Let every kept buffer go back to its allocator."""
        with self._lock:
            dropped, self._kept = self._kept, []
        del dropped  # freed outside the lock
