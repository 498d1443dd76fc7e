"""The timeline PNG: one panel per run, one row per stream, one colour per stage.

A panel is plain data (its title, its rows, its bars), built by whoever knows
what the bars are: the demo from one run it also quotes, a trace from its
lease spans. The drawing only draws it, so a test can check that a title's
figure is what its bars show without reading pixels. matplotlib is imported
when a PNG is drawn, not before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._stream import PooledStream

__all__ = ["COLOURS", "Bar", "Panel", "draw_timeline", "lane_labels"]

#: Stages of the demo's scenes, then leases by kind (a trace's spans are
#: whole leases); the legend lists those drawn, in this order.
COLOURS = {
    "copy-in": "#55A868",
    "compute": "#4C72B0",
    "copy-out": "#DD8452",
    "flood": "#A0A0A0",
    "urgent, queued": "#F2C4C4",
    "urgent": "#C44E52",
    "compute lease": "#4C72B0",
    "comm lease": "#8172B3",
    "high_priority lease": "#C44E52",
}
_OTHER = "#888888"


@dataclass(frozen=True)
class Bar:
    """One piece of work on one row: a stage of a chunk, a kernel, a lease.

    ``label``, if any, is written right of the bar.
    """

    lane: str
    stage: str
    start_ms: float
    end_ms: float
    label: str = ""

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Panel:
    """One run: drawn on its own time axis, from 0 to its last bar's end."""

    title: str
    lanes: tuple[str, ...]
    bars: tuple[Bar, ...]

    @property
    def end_ms(self) -> float:
        return max((bar.end_ms for bar in self.bars), default=0.0)

    def lane(self, name: str) -> list[Bar]:
        """The bars of one row, in time order."""
        return sorted((b for b in self.bars if b.lane == name), key=lambda b: b.start_ms)


def lane_labels(streams: Iterable[PooledStream]) -> dict[int, str]:
    """Row names for a pool's streams by ``stream_id``, as a trace names them."""
    return {s.stream_id: f"{s.kind.value}#{s.stream_id} (prio {s.priority})" for s in streams}


def _legend_stages(panels: Iterable[Panel]) -> list[str]:
    drawn = {bar.stage for panel in panels for bar in panel.bars}
    return [stage for stage in COLOURS if stage in drawn] + sorted(drawn - COLOURS.keys())


def draw_timeline(path: str | os.PathLike[str], panels: Sequence[Panel], xlabel: str) -> None:
    """Draw ``panels`` top to bottom as a PNG at ``path``, each on its own time scale.

    Bars too narrow to see are widened (drawn over their neighbours). In a
    panel whose bars have no labels of their own, a few such bars are
    labelled with their duration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    heights = [max(1, len(panel.lanes)) * 0.42 + 1.0 for panel in panels]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(12, sum(heights) + 0.7),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axis, panel in zip(axes[:, 0], panels, strict=True):
        end_ms = max(panel.end_ms, 1e-3)
        thin = end_ms / 150  # narrower bars are widened to stay visible
        narrow = [bar for bar in panel.bars if bar.duration_ms < thin]
        auto_labels = len(narrow) <= 3 and not any(bar.label for bar in panel.bars)
        rows = {lane: row for row, lane in enumerate(panel.lanes)}
        for bar in panel.bars:
            row = rows[bar.lane]
            widened = bar.duration_ms < thin
            axis.broken_barh(
                [(bar.start_ms, max(bar.duration_ms, thin))],
                (row - 0.38, 0.76),
                facecolors=COLOURS.get(bar.stage, _OTHER),
                edgecolors="white",
                linewidth=0.6,
                zorder=3 if widened else 2,
            )
            label = bar.label or (f"{bar.duration_ms:.2f} ms" if widened and auto_labels else "")
            if label:
                axis.annotate(
                    label,
                    (bar.start_ms + max(bar.duration_ms, thin), row),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
        axis.set_xlim(0, end_ms * 1.02)
        axis.set_yticks(range(len(panel.lanes)), list(panel.lanes))
        axis.set_ylim(len(panel.lanes) - 0.5, -0.5)
        axis.set_title(panel.title, loc="left", fontsize=10)
        axis.set_xlabel(xlabel, fontsize=8)
        axis.grid(axis="x", alpha=0.3)
    stages = _legend_stages(panels)
    figure.legend(
        handles=[Patch(color=COLOURS.get(stage, _OTHER), label=stage) for stage in stages],
        loc="upper right",
        ncols=max(1, len(stages)),
        fontsize=8,
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (sum(heights) + 0.7)))
    figure.savefig(path, dpi=110)
    plt.close(figure)
