"""Result records and the timing helpers every benchmark uses."""

from __future__ import annotations

import random
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Result",
    "interleaved_medians",
    "interleaved_us_per_op",
    "median_ms",
]


@dataclass(frozen=True)
class Result:
    """One figure of the benchmark suite.

    Attributes:
        group: The section it belongs to ("lease", "pipeline", ...).
        name: What was measured.
        value: The figure (None when it could not be measured here).
        unit: Its unit.
        note: Context a reader needs: the peer it compares with, a goal, why
            it is missing.
        extra: Further machine-readable figures (JSON only).
        id: A stable identifier (``"lease.with"``) that scripts and the
            documents key on; derived from ``group`` and ``name`` when not given.
    """

    group: str
    name: str
    value: float | None
    unit: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            slug = re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")
            object.__setattr__(self, "id", f"{self.group}.{slug}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run()`` in ms over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in ms of each run, the runs taken in turn ``repeats`` times.

    Every run is called once first as a warm-up (``interleaved_us_per_op``
    with one operation per batch).
    """

    def batch_of(run: Callable[[], object]) -> Callable[[int], None]:
        def batch(_one: int) -> None:
            run()

        return batch

    us = interleaved_us_per_op({name: (batch_of(run), 1) for name, run in runs.items()}, repeats)
    return {name: value / 1e3 for name, value in us.items()}


def interleaved_us_per_op(
    batches: Mapping[str, tuple[Callable[[int], None], int]], repeats: int
) -> dict[str, float]:
    """Median µs per operation of each ``(batch, number)``, the batches taken in turn.

    ``batch(n)`` runs its operation ``n`` times in a tight loop. One round of
    every batch runs first as a warm-up; then ``repeats`` rounds run each batch
    once. Taking them in turn puts every figure under the same machine state
    (a host's clock that speeds up under load, a neighbour's burst), so the
    ratios between figures hold even when the figures themselves drift. Each
    round takes the batches in a new order (shuffled with a fixed seed: the
    same orders at every run of the benchmark), so that no batch always
    follows the same one: what a batch leaves behind (cold caches, a busy
    allocator, a device still settling) falls on the others alike.
    """
    for batch, number in batches.values():
        batch(number)
    samples: dict[str, list[float]] = {name: [] for name in batches}
    order = list(batches.items())
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, (batch, number) in order:
            start = time.perf_counter_ns()
            batch(number)
            samples[name].append((time.perf_counter_ns() - start) / number / 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}
