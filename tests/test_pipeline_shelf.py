"""The pipeline's shelf of buffers kept between runs: bounds, shapes, no double hand-out.

Pure bookkeeping (no device): the shelf is checked against a model of what
it should keep, over random sequences of runs of a few shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cupystreams._pipeline_shelf import InputShape, OutputShape, Shelf, SlotBuffers

SHAPES = [InputShape(rows, 4, (3,), np.dtype(np.float32)) for rows in (8, 16, 32)]


def buffers(shape: InputShape) -> SlotBuffers:
    """A group's buffers of ``shape``; each call makes distinct objects."""
    x: Any = np.empty((shape.rows, *shape.row_shape), shape.dtype)
    output = OutputShape(shape.rows, shape.row_shape, shape.dtype)
    return SlotBuffers(shape, output, x, [], None, 0, None, None, 0)


# A run: the shape of its groups, how many it runs at once, and how many of
# the buffers it took (or made) it gives back when it ends well.
runs = st.lists(
    st.tuples(st.sampled_from(SHAPES), st.integers(1, 5), st.booleans()),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(runs=runs, most=st.integers(1, 5))
def test_kept_and_running_groups_stay_within_most_and_no_buffer_is_handed_out_twice(
    runs: list[tuple[InputShape, int, bool]], most: int
) -> None:
    shelf = Shelf()
    model: list[SlotBuffers] = []  # what the shelf should keep, oldest first
    for shape, count, ends_well in runs:
        count = min(count, most)  # a run never has more than max_in_flight groups
        taken = shelf.take(shape, count, most)
        fits = [kept for kept in reversed(model) if kept.input_shape == shape][:count]
        assert [id(kept) for kept in taken] == [id(kept) for kept in fits]
        others = [kept for kept in reversed(model) if all(kept is not f for f in fits)]
        model = others[: max(0, most - count)][::-1]  # the oldest others make room
        assert [id(kept) for kept in shelf._kept] == [id(kept) for kept in model]
        assert len(shelf) + count <= most  # kept and running groups together
        made = [buffers(shape) for _ in range(count - len(taken))]
        if ends_well:
            returned = taken + made
            shelf.put(returned, most)
            model = (model + returned)[-most:]
        assert [id(kept) for kept in shelf._kept] == [id(kept) for kept in model]
        held = [id(kept.x) for kept in shelf._kept]
        assert len(held) == len(set(held))  # never two entries for one buffer
    shelf.clear()
    assert len(shelf) == 0


def test_a_smaller_bound_lets_the_oldest_go() -> None:
    shelf = Shelf()
    first, second, third = (buffers(SHAPES[0]) for _ in range(3))
    shelf.put([first, second, third], 3)
    shelf.put([], 2)  # the pipeline's max_in_flight was lowered
    assert [id(kept) for kept in shelf._kept] == [id(second), id(third)]
    assert shelf.take(SHAPES[1], 1, 2) == []  # another shape: room for one run's group
    assert [id(kept) for kept in shelf._kept] == [id(third)]
