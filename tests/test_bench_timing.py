"""The benchmarks' timing helper: rows timed in turn (each round in a new order),
per-operation medians."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from cupystreams._bench import common


def test_rows_are_timed_in_turn_and_divided_per_operation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0]
    monkeypatch.setattr(time, "perf_counter_ns", lambda: clock[0])  # the module common reads
    calls: list[tuple[str, int]] = []

    def batch(name: str, ns_per_op: int) -> Callable[[int], None]:
        def run(n: int) -> None:
            calls.append((name, n))
            clock[0] += n * ns_per_op

        return run

    # "slow" gets slower each round: its median is the middle round's cost.
    slow_costs = iter([0, 3_000, 5_000, 4_000])  # warm-up, then three rounds

    def slow(n: int) -> None:
        calls.append(("slow", n))
        clock[0] += n * next(slow_costs)

    us = common.interleaved_us_per_op({"fast": (batch("fast", 250), 100), "slow": (slow, 10)}, 3)

    assert calls[:2] == [("fast", 100), ("slow", 10)]  # the warm-up round, in order
    for round_ in range(1, 4):  # then three rounds, each row once, in some order
        assert sorted(calls[2 * round_ : 2 * round_ + 2]) == [("fast", 100), ("slow", 10)]
    assert us == {"fast": 0.25, "slow": 4.0}


def test_no_row_always_follows_the_same_one() -> None:
    """What a row leaves behind (cold caches, a busy allocator) must not always
    fall on the same row: each round takes the rows in a new order."""
    calls: list[str] = []
    rows = {name: (lambda _n, name=name: calls.append(name), 1) for name in "abcde"}
    common.interleaved_us_per_op(rows, 40)
    rounds = [calls[i : i + 5] for i in range(5, len(calls), 5)]  # after the warm-up
    assert all(sorted(r) == list("abcde") for r in rounds)
    for name in "abcde":
        before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
        assert len(before) == 4, f"{name} followed only {sorted(before)}"


def test_adapter_rows_keep_their_own_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows may time the same adapter call against different framework calls:
    each result keeps the id its row gives, so the documents can key on it."""
    from cupystreams._bench import adapters, suite

    rows = [
        {"id": f"adapters.{name}", "name": "with torch.use(lease)", "median_us": 2.0,
         "baseline": baseline, "baseline_us": 9.0}
        for name, baseline in (("a", "ExternalStream"), ("b", "prebuilt"))
    ]  # fmt: skip
    monkeypatch.setattr(adapters, "run_adapter_benchmarks", lambda repeats: rows)
    results = suite._adapter_results("cupy", quick=True)
    assert [r.id for r in results] == ["adapters.a", "adapters.b"]
    assert all("id" not in r.extra for r in results)


@pytest.mark.gpu
def test_the_adapter_benchmarks_have_distinct_ids() -> None:
    from cupystreams._bench import suite

    ids = [r.id for r in suite._adapter_results("cupy", quick=True)]
    assert len(ids) == len(set(ids)) and all(i.startswith("adapters.") for i in ids), ids
