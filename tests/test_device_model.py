"""The device model behind the host demo: CUDA's stream rules on modelled engines."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupystreams._bench.model import H100, DeviceModel, DeviceParams, Interval, Op

# Round numbers, so expected times can be worked out by hand.
SIMPLE = DeviceParams(
    name="simple",
    h2d_ms_per_mib=1.0,
    d2h_ms_per_mib=1.0,
    duplex_ms_per_mib=2.0,
    compute_ms_per_mib=1.0,
    sms=4,
    launch_ms=0.0,
)


def overlap(a: Interval, b: Interval) -> bool:
    return a.start_ms < b.end_ms and b.start_ms < a.end_ms


def test_one_stream_runs_in_order_and_never_overlaps_itself() -> None:
    model = DeviceModel(SIMPLE)
    model.copy(0, "h2d", 1, "copy-in")
    model.kernel(0, blocks=4, block_ms=1, stage="compute")
    model.copy(0, "d2h", 1, "copy-out")
    assert model.finish() == pytest.approx(3.0)
    a, b, c = model.intervals()
    assert (a.start_ms, a.end_ms, b.start_ms, b.end_ms, c.start_ms, c.end_ms) == (0, 1, 1, 2, 2, 3)


def test_streams_overlap_on_different_engines_and_queue_on_the_same_one() -> None:
    model = DeviceModel(SIMPLE)
    first = model.copy(0, "h2d", 1, "copy-in")
    kernel = model.kernel(1, blocks=4, block_ms=1, stage="compute")
    second = model.copy(2, "h2d", 1, "copy-in")
    model.finish()
    assert kernel.start_ms == first.start_ms == 0  # copy engine and SMs at once
    assert second.start_ms == first.end_ms == 1  # one copy engine each way


def test_both_directions_at_once_share_the_link() -> None:
    model = DeviceModel(SIMPLE)
    model.copy(0, "h2d", 1, "copy-in")
    model.copy(1, "d2h", 1, "copy-out")
    # Both at the duplex rate (2 ms per MiB) for the whole MiB.
    assert model.finish() == pytest.approx(2.0)
    model = DeviceModel(SIMPLE)
    model.copy(0, "h2d", 2, "copy-in")
    model.copy(1, "d2h", 0.5, "copy-out")
    # 0.5 MiB each by t = 1; then the copy-in is alone: 1.5 MiB at 1 ms.
    assert model.finish() == pytest.approx(2.5)


def test_an_event_orders_work_across_streams() -> None:
    model = DeviceModel(SIMPLE)
    copy = model.copy(0, "h2d", 3, "copy-in")
    kernel = model.kernel(1, blocks=1, block_ms=1, stage="compute", after=(copy,))
    model.finish()
    assert kernel.start_ms == copy.end_ms == 3


def test_a_higher_priority_kernel_takes_the_next_free_sm_but_preempts_nothing() -> None:
    model = DeviceModel(SIMPLE)
    flood = [model.kernel(s, blocks=4 * 10, block_ms=1, stage="flood") for s in range(2)]
    model.sleep(2.5)  # mid-block: every SM is busy
    urgent = model.kernel(5, blocks=1, block_ms=0.1, stage="urgent", priority=-5)
    model.finish()
    assert urgent.start_ms == 3.0  # when the running blocks end, not at 2.5
    assert urgent.end_ms == pytest.approx(3.1)
    # The flood's blocks went on around it, one SM short for one short block.
    assert flood[0].end_ms == pytest.approx(10.1)


def test_at_equal_priority_a_late_kernel_waits_for_the_kernels_ready_before_it() -> None:
    model = DeviceModel(SIMPLE)
    first = model.kernel(0, blocks=4 * 10, block_ms=1, stage="flood")
    second = model.kernel(1, blocks=4 * 10, block_ms=1, stage="flood")
    model.sleep(2.5)
    late = model.kernel(2, blocks=1, block_ms=0.1, stage="urgent")
    model.finish()
    assert first.end_ms == 10 and second.end_ms == 20
    assert late.start_ms == 20


def test_the_host_waits_then_queues_later() -> None:
    model = DeviceModel(SIMPLE)
    copy = model.copy(0, "h2d", 2, "copy-in")
    model.wait(copy)
    assert model.host_ms == 2
    later = model.copy(1, "h2d", 1, "copy-in")
    model.finish()
    assert later.ready_ms == 2 and later.start_ms == 2


def test_a_mark_completes_when_its_stream_reaches_it() -> None:
    model = DeviceModel(SIMPLE)
    before = model.mark(0)
    model.kernel(0, blocks=1, block_ms=1.5, stage="compute")
    after = model.mark(0)
    model.wait(after)
    assert (before.end_ms, after.end_ms) == (0, 1.5)


def test_launches_cost_host_time() -> None:
    model = DeviceModel(H100)
    ops = [model.mark(0) for _ in range(3)]
    assert [op.queued_ms for op in ops] == pytest.approx([0.004, 0.008, 0.012])


def test_bad_operations_are_refused() -> None:
    model = DeviceModel(SIMPLE)
    with pytest.raises(ValueError, match="direction"):
        model.copy(0, "sideways", 1, "copy-in")
    with pytest.raises(ValueError, match="blocks"):
        model.kernel(0, blocks=0, block_ms=1, stage="compute")


# -- any workload ----------------------------------------------------------

operation = st.tuples(
    st.sampled_from(["h2d", "d2h", "sm", "mark"]),
    st.integers(0, 3),  # stream
    st.floats(0.1, 3.0),  # MiB, or ms per block
    st.integers(1, 12),  # blocks
    st.sampled_from([0, -1, -5]),  # priority
    st.lists(st.integers(0, 40), max_size=2),  # waits on earlier operations
    st.sampled_from([None, "wait", "sleep"]),  # what the host does after queuing it
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, min_size=1, max_size=40))
def test_any_schedule_keeps_stream_order_waits_and_engine_exclusivity(
    workload: list[tuple[str, int, float, int, int, list[int], str | None]],
) -> None:
    model = DeviceModel(SIMPLE)
    ops: list[Op] = []
    for engine, stream, amount, blocks, priority, waits, host in workload:
        after = [ops[i] for i in waits if i < len(ops)]
        if engine == "mark":
            op = model.mark(stream)
        elif engine == "sm":
            op = model.kernel(stream, blocks, amount, "compute", priority, after)
        else:
            op = model.copy(stream, engine, amount, engine, after)
        ops.append(op)
        if host == "wait":
            model.wait(op)
        elif host == "sleep":
            model.sleep(amount)
    end = model.finish()

    for op in ops:
        assert op.ready_ms is not None and op.start_ms is not None and op.end_ms is not None
        assert op.queued_ms <= op.ready_ms <= op.start_ms <= op.end_ms <= end
        for dep in op.after:
            assert dep.end_ms is not None and op.ready_ms >= dep.end_ms
    by_stream = sorted(ops, key=lambda op: (op.stream, op.index))
    for a, b in itertools.pairwise(by_stream):
        if a.stream == b.stream:
            assert a.end_ms is not None and b.start_ms is not None
            assert b.start_ms >= a.end_ms  # stream order: never overlapping itself
    intervals = model.intervals()
    for engine in ("h2d", "d2h"):
        copies = [i for i in intervals if i.engine == engine]
        for one, other in itertools.combinations(copies, 2):
            assert not overlap(one, other), (one, other)
    assert model.peak_sms <= SIMPLE.sms


def test_the_same_work_gives_the_same_schedule() -> None:
    def schedule() -> list[Interval]:
        model = DeviceModel(H100)
        for s in range(3):
            model.copy(s, "h2d", 64, "copy-in")
            model.kernel(s, H100.sms * 4, 0.1, "compute", priority=-s)
            model.copy(s, "d2h", 64, "copy-out")
        model.finish()
        return model.intervals()

    assert schedule() == schedule()
