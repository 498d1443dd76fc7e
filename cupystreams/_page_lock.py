"""Page-locking callers' arrays in place, so that copies read them directly.

The GPU's copy engines read and write only page-locked host memory. An
ordinary (pageable) numpy array is therefore staged through page-locked
buffers by host threads, which costs a memcpy per byte each way. Locking the
array's own pages (``cudaHostRegister``) removes that memcpy, but locking
takes time too, comparable to staging the array once; so an array is locked
the second time a run sees it (an array seen once may never come back), and
stays locked while it lives, up to a bound.

The lock is undone (``cudaHostUnregister``) by a finalizer on the array that
owns the memory, which runs before numpy frees it, or when the bound pushes
the least recently used array out. (A pipeline asks only about arrays it
does not know to be page-locked, so of its arrays that is the one locked
earliest.)

Locking: ``PageLocks._lock`` guards ``_seen``, ``_locked``, ``_bytes``,
``_busy`` and each entry's ``unlocking``, and is taken to add a hold
(so that the bounds see every hold they must respect); it is never held
during a CUDA call, and is taken before an entry's ``guard``, never after.
``_Locked.guard`` (re-entrant) guards one array's ``registered`` flag, which
is cleared before the unlock call, so the finalizer and an eviction that
meet (even on one thread, the finalizer running inside the eviction) unlock
the memory once; and its ``holds``, which are given back under it alone.
``_live_unlocks_lock`` guards the count of ``live_unlocks()`` (read without
it); nothing is taken while it is held.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np

__all__ = ["PageLocks", "cupy_page_locks", "hold", "live_unlocks", "memory_owner", "release"]

# cudaHostRegisterPortable: locked for every CUDA context, as CuPy's pinned
# memory is, so a pool of any device can copy from it.
_REGISTER_PORTABLE = 1


_live_unlocks = 0
_live_unlocks_lock = threading.Lock()


def live_unlocks() -> int:
    """How many times the page locks of this process, of any device, unlocked
    an array that was still alive (to make room, or in ``clear()``).

    Whoever remembers an array as page-locked asks again once this changes.
    (Locks are portable, seen by every device, so one device's unlock counts
    for all. A dead array's unlock is not counted: nobody can pass it again.)
    """
    return _live_unlocks


def _count_live_unlocks(count: int) -> None:
    global _live_unlocks
    if count:
        with _live_unlocks_lock:
            _live_unlocks += count


def memory_owner(array: np.ndarray) -> np.ndarray | None:
    """The ndarray that owns ``array``'s memory, or None when numpy does not own it."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array if array.base is None and array.flags.owndata else None


class _Locked:
    """One page-locked range, whether it still is, and who uses it now."""

    __slots__ = (
        "__weakref__",
        "guard",
        "holds",
        "locks",
        "nbytes",
        "ptr",
        "registered",
        "unlocking",
    )

    def __init__(self, ptr: int, nbytes: int, locks: PageLocks) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.registered = True
        self.guard = threading.RLock()
        # Runs and graphs copying from or into it now: the bounds never unlock
        # it under them. Taken under locks._lock (as the bounds decide) and
        # guard, given back under guard alone (a graph's finalizer may give it
        # back inside a section that holds locks._lock).
        self.holds = 0
        # Taken off the table to be unlocked (under locks._lock): no new holds.
        self.unlocking = False
        self.locks = locks

    def hold(self) -> bool:
        """One more user, if it is still locked (False: it is being, or was, unlocked)."""
        with self.locks._lock:
            return self._hold_locked()

    def _hold_locked(self) -> bool:
        """``hold``, with ``locks._lock`` held by the caller."""
        if self.unlocking or not self.registered:
            return False
        with self.guard:
            self.holds += 1
        return True

    def release(self) -> None:
        """Undo one ``hold``."""
        with self.guard:
            self.holds -= 1


def _unlock(entry: _Locked, unregister: Callable[[int], None]) -> None:
    with entry.guard:
        if not entry.registered:
            return
        entry.registered = False
    unregister(entry.ptr)


class PageLocks:
    """The arrays one device's pipelines copy from and into directly.

    A run or a graph that copies straight from or into an array locked here
    holds it (``hold``) meanwhile: the bounds unlock only arrays nobody holds,
    and an array that finds no room otherwise is staged instead.

    Args:
        register: ``cudaHostRegister(ptr, nbytes)``; raises when it cannot.
        unregister: ``cudaHostUnregister(ptr)``.
        max_arrays: At most this many arrays locked at once.
        max_bytes: At most this many bytes locked at once.
    """

    def __init__(
        self,
        register: Callable[[int, int], None],
        unregister: Callable[[int], None],
        max_arrays: int = 16,
        max_bytes: int = 16 << 30,
    ) -> None:
        self._register = register
        self._unregister = unregister
        self.max_arrays = max_arrays
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # Owners seen once, by (pointer, size): a second sighting locks them.
        self._seen: OrderedDict[tuple[int, int], weakref.ref[np.ndarray]] = OrderedDict()
        self._locked: OrderedDict[tuple[int, int], tuple[weakref.ref[np.ndarray], _Locked]] = (
            OrderedDict()
        )
        self._bytes = 0
        # (pointer, size) of ranges being locked or unlocked now, each with how
        # many calls are at it: their state in the driver is changing, so
        # nobody may take them for locked (or for not ours) meanwhile.
        self._busy: Counter[tuple[int, int]] = Counter()

    def locked(self) -> list[tuple[int, int]]:
        """(pointer, bytes) of every range locked now."""
        with self._lock:
            return [(e.ptr, e.nbytes) for _, e in self._locked.values() if e.registered]

    def in_use(self) -> list[tuple[int, int]]:
        """(pointer, bytes) of every range locked now that a run or a graph holds."""
        with self._lock:
            return [(e.ptr, e.nbytes) for _, e in self._locked.values() if e.holds]

    def make_direct(self, array: np.ndarray) -> bool:
        """True when ``array``'s memory is page-locked (now, or already by this object).

        False for an array seen for the first time, one numpy does not own,
        one beyond the bounds, or one the driver refuses to lock; such an
        array is staged instead.
        """
        owner = memory_owner(array)
        if owner is None or not owner.flags.c_contiguous or owner.nbytes == 0:
            return False
        key = (owner.ctypes.data, owner.nbytes)
        if key[1] > self.max_bytes:
            return False
        with self._lock:
            known = self._locked.get(key)
            if known is not None and known[0]() is owner and known[1].registered:
                self._locked.move_to_end(key)
                return True
            seen = self._seen.pop(key, None)
            if seen is None or seen() is not owner:
                self._seen[key] = weakref.ref(owner)
                while len(self._seen) > 4 * self.max_arrays:
                    self._seen.popitem(last=False)
                return False
            evicted = self._make_room_locked(key[1])
            if evicted is None:
                # The arrays in the way are in use: stage this one, and try
                # again at its next sighting.
                self._seen[key] = seen
                return False
            self._taken_off_locked(evicted)
            self._busy[key] += 1  # being locked: see _lock_owner
        self._unlock_all(evicted)
        return self._lock_owner(owner, key)

    def hold(self, array: np.ndarray) -> tuple[bool, _Locked | None]:
        """Keep ``array``'s pages locked until the returned entry's ``release()``.

        Returns (True, the entry) when this object locked them; (True, None)
        when it did not (nothing to hold here); (False, None) while it is
        unlocking them: copy the array staged.
        """
        owner = memory_owner(array)
        if owner is None:
            return True, None
        key = (owner.ctypes.data, owner.nbytes)
        with self._lock:
            if self._busy[key]:
                return False, None
            known = self._locked.get(key)
            if known is None or known[0]() is not owner or not known[1]._hold_locked():
                return True, None
            return True, known[1]

    def _taken_off_locked(self, entries: list[_Locked]) -> None:
        """Mark ``entries``, just taken off the table, as being unlocked: no new
        holds, and counted before anyone could see them unlocked."""
        for entry in entries:
            entry.unlocking = True
            self._busy[(entry.ptr, entry.nbytes)] += 1
        _count_live_unlocks(len(entries))

    def _unlock_all(self, entries: list[_Locked]) -> None:
        """Unlock ``entries`` (outside the lock: a CUDA call each; every one, even
        if one fails, which is raised last), then mark them no longer busy."""
        failure: Exception | None = None
        for entry in entries:
            try:
                _unlock(entry, self._unregister)
            except Exception as exc:
                failure = failure or exc
        self._done([(entry.ptr, entry.nbytes) for entry in entries])
        if failure is not None:
            raise failure

    def _done(self, keys: list[tuple[int, int]]) -> None:
        """The driver is done locking or unlocking ``keys``."""
        with self._lock:
            for key in keys:
                self._busy[key] -= 1
                if self._busy[key] <= 0:
                    del self._busy[key]

    def _make_room_locked(self, nbytes: int) -> list[_Locked] | None:
        """Forget dead arrays, then take the least recently used ones that nobody
        holds off the table until ``nbytes`` more fit: those to unlock. None (and
        nothing taken) when they cannot be made to fit."""
        for key, (owner_ref, entry) in list(self._locked.items()):
            if owner_ref() is None or not entry.registered:
                del self._locked[key]
                self._bytes -= entry.nbytes
        arrays, used = len(self._locked), self._bytes
        chosen = []
        for key, (_, entry) in self._locked.items():  # least recently used first
            if arrays < self.max_arrays and used + nbytes <= self.max_bytes:
                break
            if not entry.holds:
                chosen.append(key)
                arrays, used = arrays - 1, used - entry.nbytes
        if arrays >= self.max_arrays or used + nbytes > self.max_bytes:
            return None
        evicted = []
        for key in chosen:
            _, entry = self._locked.pop(key)
            self._bytes -= entry.nbytes
            evicted.append(entry)
        return evicted

    def _lock_owner(self, owner: np.ndarray, key: tuple[int, int]) -> bool:
        """Lock ``owner``'s pages (``key``, marked busy by the caller: between the
        driver's lock and the table's entry, nobody takes them for not ours)."""
        try:
            try:
                self._register(*key)
            except Exception:
                return False  # already locked by someone else, or the driver says no: stage
            entry = _Locked(*key, self)
            # Runs before numpy frees the memory: the owner's weak references
            # are cleared first thing in its deallocation.
            weakref.finalize(owner, _unlock, entry, self._unregister)
            with self._lock:
                self._locked[key] = (weakref.ref(owner), entry)
                self._bytes += entry.nbytes
            return True
        finally:
            self._done([key])

    def clear(self) -> None:
        """Unlock every array that nobody holds (tests; and a device being given up)."""
        with self._lock:
            entries = [entry for _, entry in self._locked.values() if not entry.holds]
            self._locked = OrderedDict(
                (key, known) for key, known in self._locked.items() if known[1].holds
            )
            self._seen.clear()
            self._bytes = sum(entry.nbytes for _, entry in self._locked.values())
            self._taken_off_locked(entries)
        self._unlock_all(entries)


def cupy_page_locks(device: int) -> PageLocks:
    """The process's ``PageLocks`` for a CUDA device (made on first use)."""
    with _registry_lock:
        locks = _registries.get(device)
        if locks is None:
            import cupy

            runtime = cupy.cuda.runtime

            def register(ptr: int, nbytes: int) -> None:
                with cupy.cuda.Device(device):
                    runtime.hostRegister(ptr, nbytes, _REGISTER_PORTABLE)

            locks = _registries[device] = PageLocks(register, runtime.hostUnregister)
        return locks


def hold(array: np.ndarray) -> tuple[bool, _Locked | None]:
    """``PageLocks.hold`` of the page locks of every device (a lock is every
    device's): held by the one that locked ``array``, if any."""
    with _registry_lock:
        registries = list(_registries.values())
    for locks in registries:
        usable, held = locks.hold(array)
        if not usable or held is not None:
            return usable, held
    return True, None


def release(holds: list[_Locked]) -> None:
    """Give back every hold in ``holds``, and empty it."""
    taken = holds[:]
    holds.clear()
    for entry in taken:
        entry.release()


_registry_lock = threading.Lock()  # guards _registries
_registries: dict[int, PageLocks] = {}
