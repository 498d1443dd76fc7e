"""Page-locking arrays in place: when an array is locked, and that it is always unlocked.

The cache logic runs on the CPU with a fake driver that records what is
locked; the GPU tests run the pipeline on real pageable arrays.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import numpy as np
import pytest

from cupystreams import CudaStreamPool
from cupystreams._page_lock import PageLocks, live_unlocks, memory_owner
from cupystreams._pipeline_engines import _KnownDirect
from cupystreams.pipeline import Pipeline


class FakeDriver:
    """cudaHostRegister / cudaHostUnregister that record what is locked."""

    def __init__(self, refuse: bool = False) -> None:
        self.locked: dict[int, int] = {}
        self.unlocks = 0
        self.refuse = refuse

    def register(self, ptr: int, nbytes: int) -> None:
        if self.refuse or ptr in self.locked:
            raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")
        self.locked[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        assert ptr in self.locked, "unlocked twice, or never locked"
        del self.locked[ptr]
        self.unlocks += 1


def make(driver: FakeDriver, **bounds: int) -> PageLocks:
    return PageLocks(driver.register, driver.unregister, **bounds)


def lock(locks: PageLocks, *arrays: np.ndarray) -> None:
    """Show each array to ``locks`` twice: the second sighting locks it."""
    for array in arrays:
        locks.make_direct(array)
        locks.make_direct(array)


def test_an_array_is_locked_the_second_time_it_is_seen() -> None:
    driver = FakeDriver()
    locks = make(driver)
    data = np.ones(1 << 16, np.float32)
    assert not locks.make_direct(data)  # the first time: staged, nothing locked
    assert driver.locked == {}
    assert locks.make_direct(data)
    assert driver.locked == {data.ctypes.data: data.nbytes}
    assert locks.make_direct(data[10:])  # any view of it is direct now
    assert len(driver.locked) == 1


def test_a_freed_array_is_unlocked_before_its_memory_goes() -> None:
    driver = FakeDriver()
    locks = make(driver)
    data = np.ones(1 << 16, np.float32)
    locks.make_direct(data)
    view = data[5:]
    locks.make_direct(view)
    del data
    assert driver.locked, "a view still holds the memory"
    del view
    gc.collect()
    assert driver.locked == {}
    assert locks.locked() == []


def test_the_bounds_hold_and_evict_the_least_recently_used() -> None:
    driver = FakeDriver()
    locks = make(driver, max_arrays=2)
    arrays = [np.ones(1024, np.float32) * i for i in range(3)]
    for array in arrays:
        lock(locks, array)
    assert len(driver.locked) == 2
    assert arrays[0].ctypes.data not in driver.locked  # the oldest went
    small = make(FakeDriver(), max_bytes=4096)
    big = np.ones(2048, np.float32)  # 8 KiB
    assert not small.make_direct(big) and not small.make_direct(big)


def test_eviction_and_the_finalizer_unlock_once() -> None:
    driver = FakeDriver()
    locks = make(driver, max_arrays=1)
    first = np.ones(1024, np.float32)
    lock(locks, first)
    second = np.ones(1024, np.float32)
    locks.make_direct(second)
    before = live_unlocks()
    locks.make_direct(second)  # evicts first: unlocked now
    assert driver.unlocks == 1
    assert live_unlocks() == before + 1  # whoever remembers first as locked must ask again
    del first
    gc.collect()
    assert driver.unlocks == 1  # its finalizer found it unlocked already
    locks.clear()
    assert driver.locked == {}
    assert live_unlocks() == before + 2


def test_a_dead_arrays_unlock_is_not_counted() -> None:
    locks = make(FakeDriver())
    data = np.ones(1024, np.float32)
    lock(locks, data)
    before = live_unlocks()
    del data
    gc.collect()
    assert locks.locked() == [] and live_unlocks() == before  # nobody can pass it again


def test_an_array_known_direct_is_asked_about_again_when_it_may_have_changed() -> None:
    known = _KnownDirect()
    data = np.ones(64, np.float32)
    known.put(data, 1234, unlocks=0)
    assert known.get(data, 0) == 1234
    assert known.get(data, 1) is None  # page locks unlocked a live array since
    assert known.get(data.copy(), 0) is None  # another array
    assert known.get(data[:32], 0) is None  # a view is another array too
    data.shape = (8, 8)  # reshaped in place
    assert known.get(data, 0) is None
    known.put(data, 1234, unlocks=0)
    assert known.get(data, 0) == 1234
    many = [np.ones(4, np.float32) for _ in range(3 * _KnownDirect._MOST)]
    for address, array in enumerate(many):
        known.put(array, address, 0)
    assert known.get(data, 0) is None  # the oldest are forgotten
    assert known.get(many[-1], 0) == len(many) - 1
    assert len(known._known) == _KnownDirect._MOST


def test_a_new_array_under_a_dead_ones_id_is_not_taken_for_it() -> None:
    known = _KnownDirect()
    for _ in range(1000):
        dead = np.ones(64, np.float32)
        known.put(dead, 1234, 0)
        dead_id = id(dead)
        del dead
        new = np.ones(64, np.float32)  # CPython soon gives a new object a freed one's memory
        if id(new) == dead_id:
            break
    assert id(new) == dead_id, "no id was reused: the check below would test nothing"
    assert known.get(new, 0) is None  # same id, shape and strides: another array all the same


def test_memory_numpy_does_not_own_is_never_locked() -> None:
    driver = FakeDriver()
    locks = make(driver)
    foreign = np.frombuffer(bytearray(4096), np.uint8)
    assert memory_owner(foreign) is None
    assert not locks.make_direct(foreign) and not locks.make_direct(foreign)
    refusing = FakeDriver(refuse=True)
    locks = make(refusing)
    data = np.ones(16, np.float32)
    assert not locks.make_direct(data) and not locks.make_direct(data)  # staged instead


@pytest.mark.gpu
def test_pageable_runs_lock_on_the_second_run_and_unlock_when_freed() -> None:
    import cupy

    from cupystreams._page_lock import cupy_page_locks

    locks = cupy_page_locks(cupy.cuda.runtime.getDevice())
    locks.clear()
    with CudaStreamPool(2, 2, 0, backend="cupy") as pool:
        pipe = Pipeline(pool, lambda x: x * 2 + 1, chunk_bytes=1 << 20)
        data = np.random.default_rng(0).random(3 << 20, dtype=np.float32)  # pageable
        out = np.zeros_like(data)
        expected = data * 2 + 1
        pipe.run(data, out)
        assert locks.locked() == [], "a first run locked an array"
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        out[:] = 0
        pipe.run(data, out)
        assert sorted(n for _, n in locks.locked()) == [data.nbytes, out.nbytes]
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        data[:] = 3.0  # changed in place between runs: the copies read it afresh
        pipe.run(data, out)
        assert np.all(out == 7.0)
        # Unlocked while alive (as the bounds evict the least recently used):
        # the pipeline asks again instead of trusting what it knew, stages the
        # arrays the next run, and locks them again the run after.
        locks.clear()
        data[:] = 4.0
        pipe.run(data, out)
        assert locks.locked() == [] and np.all(out == 9.0)
        pipe.run(data, out)
        assert sorted(n for _, n in locks.locked()) == [data.nbytes, out.nbytes]
        assert np.all(out == 9.0)
        assert locks.in_use() == [], "a run left an array held"
        del data, out
        gc.collect()
        assert locks.locked() == [], "an array freed while locked"


def test_an_array_in_use_is_never_unlocked_to_make_room() -> None:
    driver = FakeDriver()
    locks = make(driver, max_arrays=1)
    first = np.ones(1024, np.float32)
    lock(locks, first)
    usable, held = locks.hold(first)
    assert usable and held is not None and held.holds == 1
    second = np.ones(1024, np.float32)
    locks.make_direct(second)
    before = live_unlocks()
    assert not locks.make_direct(second)  # no room but first's, which is in use: staged
    assert locks.locked() == [(first.ctypes.data, first.nbytes)] and driver.unlocks == 0
    assert live_unlocks() == before
    held.release()
    assert locks.make_direct(second)  # tried again at its next sighting: first goes now
    assert locks.locked() == [(second.ctypes.data, second.nbytes)] and driver.unlocks == 1
    assert not held.hold()  # unlocked since: nothing to hold
    assert locks.hold(first) == (True, None)  # not locked here any more: nothing to hold
    assert locks.hold(np.ones(4)) == (True, None)
    assert locks.hold(second)[1] is not None
    locks.clear()  # clear() too leaves an array in use
    assert locks.locked() == [(second.ctypes.data, second.nbytes)]


def test_room_is_made_only_when_it_can_be_made() -> None:
    """No array is unlocked for nothing: if the arrays nobody holds cannot make
    room, none of them is unlocked."""
    driver = FakeDriver()
    locks = make(driver, max_arrays=4, max_bytes=4 << 12)
    small = [np.ones(1024, np.float32) for _ in range(3)]  # 4 KiB each
    for array in small:
        lock(locks, array)
    assert locks.hold(small[1])[1] is not None and locks.hold(small[2])[1] is not None
    big = np.ones(3 * 1024, np.float32)  # 12 KiB: fits only if two of the small ones go
    locks.make_direct(big)
    assert not locks.make_direct(big)
    assert driver.unlocks == 0 and len(locks.locked()) == 3


def fake_engine(monkeypatch: pytest.MonkeyPatch, driver: FakeDriver, locks: PageLocks) -> Any:
    """The cupy engine's memo and holds over ``locks``, with ``driver`` as CUDA:
    an array is page-locked when the driver holds its owner's range."""
    from cupystreams import _page_lock
    from cupystreams._pipeline_engines import CupyEngine

    engine = object.__new__(CupyEngine)
    engine._page_locks = locks
    engine._known_direct = _KnownDirect()
    engine.asked = 0

    def is_direct(array: np.ndarray) -> bool:
        engine.asked += 1
        owner = memory_owner(array)
        return owner is not None and owner.ctypes.data in driver.locked

    engine.is_direct = is_direct
    monkeypatch.setattr(_page_lock, "_registries", {0: locks})
    return engine


def test_a_run_holds_what_it_copies_directly_and_asks_the_driver_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driver = FakeDriver()
    locks = make(driver, max_arrays=1)
    engine = fake_engine(monkeypatch, driver, locks)
    data = np.ones(1024, np.float32)
    holds: list[Any] = []
    assert engine.direct_address(data, holds) is None and holds == []  # first sighting
    assert engine.direct_address(data, holds) == data.ctypes.data  # locked now, and held
    assert locks.in_use() == [(data.ctypes.data, data.nbytes)]
    other = np.ones(1024, np.float32)
    lock(locks, other)  # no room: data is in use
    assert locks.locked() == [(data.ctypes.data, data.nbytes)]
    engine.release(holds)
    assert holds == [] and locks.in_use() == []
    asked = engine.asked
    assert engine.direct_address(data, holds) == data.ctypes.data  # known: held again
    assert engine.asked == asked and locks.in_use() == [(data.ctypes.data, data.nbytes)]
    engine.release(holds)


def test_an_array_being_unlocked_is_staged_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between taking an array off the table and the driver's unlock, a run that
    knew the array must not hold it (nor copy from it directly)."""
    unlocking, go_on = threading.Event(), threading.Event()

    class SlowDriver(FakeDriver):
        def unregister(self, ptr: int) -> None:
            unlocking.set()
            go_on.wait(5)
            super().unregister(ptr)

    driver = SlowDriver()
    locks = make(driver)
    engine = fake_engine(monkeypatch, driver, locks)
    data = np.ones(1024, np.float32)
    holds: list[Any] = []
    engine.direct_address(data, holds)
    assert engine.direct_address(data, holds) == data.ctypes.data
    engine.release(holds)
    clearing = threading.Thread(target=locks.clear)
    clearing.start()
    try:
        assert unlocking.wait(5)  # data is off the table; the driver has not unlocked it yet
        assert engine.direct_address(data, holds) is None and holds == []
    finally:
        go_on.set()
        clearing.join()
    assert driver.locked == {} and locks.in_use() == []


def test_an_array_being_locked_is_staged_not_taken_for_not_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the driver's lock and the table's entry, the pages look locked
    but nobody holds them: a run then must stage the array, not remember it
    as locked by someone else (it would never hold it, and could see it
    unlocked under a copy)."""
    registered, go_on = threading.Event(), threading.Event()

    class SlowDriver(FakeDriver):
        def register(self, ptr: int, nbytes: int) -> None:
            super().register(ptr, nbytes)  # the driver has locked it now
            registered.set()
            go_on.wait(5)

    driver = SlowDriver()
    locks = make(driver, max_arrays=1)
    engine = fake_engine(monkeypatch, driver, locks)
    data = np.ones(1024, np.float32)
    locks.make_direct(data)  # first sighting
    locking = threading.Thread(target=locks.make_direct, args=(data,))
    locking.start()
    holds: list[Any] = []
    try:
        assert registered.wait(5)
        assert engine.direct_address(data, holds) is None and holds == []
    finally:
        go_on.set()
        locking.join()
    assert engine.direct_address(data, holds) == data.ctypes.data  # locked: held now
    assert locks.in_use() == [(data.ctypes.data, data.nbytes)]
    engine.release(holds)
