"""Shared tools of the reliability suite: live-object counts, thread runs, figures.

The reliability tests (``test_stress``, ``test_faults``, ``test_bad_input``,
``test_leaks``) import this module; it is not a conftest so that the core's
fixtures stay as they are.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import pytest

from cupystreams import PooledEvent, PooledStream, StreamLease, StreamState, reset_global_pool

# Host-backend streams run on threads with this name prefix (cupystreams._backends._host).
HOST_THREAD_PREFIX = "cupystreams-host"
FIGURES_ENV_VAR = "CUPYSTREAMS_RELIABILITY_LOG"


@dataclass(frozen=True)
class LiveObjects:
    """What cupystreams objects are alive right now.

    Attributes:
        streams: Pooled streams not yet closed (each holds a device stream).
        events: Pooled events held by someone (not yet released); idle events
            are raw handles inside their pool, counted by its ``stats()``.
        leases: Leases not released (a lease of a closed pool counts until it
            is released or dropped).
        host_threads: Worker threads of host-backend streams.
    """

    streams: int
    events: int
    leases: int
    host_threads: int


def live_objects() -> LiveObjects:
    """Collect garbage, then count the live streams, events, leases and host threads."""
    gc.collect()
    streams = events = leases = 0
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance(): no proxy's __class__ runs here
        if kind is PooledStream:
            # A stream whose creation failed has no state yet, and nothing to close.
            streams += getattr(obj, "state", StreamState.CLOSED) is not StreamState.CLOSED
        elif kind is PooledEvent:
            events += bool(obj._held)
        elif kind is StreamLease:
            leases += not obj.released
    threads = sum(t.name.startswith(HOST_THREAD_PREFIX) for t in threading.enumerate())
    return LiveObjects(streams, events, leases, threads)


@contextlib.contextmanager
def no_leaks() -> Iterator[None]:
    """Fail if the block leaves more live pool objects than it found.

    Global pools are reset on both sides: they are meant to outlive a block.
    Fewer objects is no leak: an earlier failed test's traceback may have held some.
    """
    reset_global_pool()
    before = live_objects()
    yield
    reset_global_pool()
    after = live_objects()
    grown = {
        name: f"{value} -> {getattr(after, name)}"
        for name, value in asdict(before).items()
        if getattr(after, name) > value
    }
    if grown:
        pytest.fail(f"the test left live cupystreams objects behind: {grown}")


@contextlib.contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """Run the block with ``sys.setswitchinterval(seconds)`` (None: unchanged)."""
    old = sys.getswitchinterval()
    if seconds is not None:
        sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def thread_stacks(threads: Sequence[threading.Thread]) -> str:
    """The current Python stack of each of ``threads``, for a hang report."""
    frames = sys._current_frames()
    parts = []
    for t in threads:
        frame = frames.get(t.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame else "  (no frame)\n"
        parts.append(f"--- {t.name}\n{stack}")
    return "".join(parts)


def run_threads(workers: Sequence[Callable[[], None]], *, timeout: float, what: str) -> None:
    """Run each worker on its own daemon thread; fail on a hang or an error.

    Args:
        workers: Callables, one thread each, started together.
        timeout: Seconds all of them get; a thread still running then is a
            hang, reported with every live thread's stack.
        what: Names the threads and the failure.

    Raises:
        The first exception a worker raised (with the worker's name noted).
    """
    errors: list[tuple[str, BaseException]] = []

    def guarded(name: str, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # reported to the test's thread below
            errors.append((name, exc))

    threads = [
        threading.Thread(target=guarded, args=(f"{what}-{i}", w), name=f"{what}-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    if hung:
        pytest.fail(
            f"{what}: {len(hung)} of {len(threads)} threads still running after {timeout} s "
            f"(a hang):\n{thread_stacks(threading.enumerate())}"
        )
    if errors:
        name, exc = errors[0]
        raise AssertionError(f"{what}: {name} raised {exc!r} ({len(errors)} errors)") from exc


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.001)


def env_number(name: str, default: float) -> float:
    """A non-negative number from the environment variable ``name``, or ``default``."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{name}={raw!r} must be a number >= 0")
    return value


def record_figures(test: str, **figures: object) -> None:
    """Append one JSON line of figures to ``$CUPYSTREAMS_RELIABILITY_LOG`` if it is set.

    RELIABILITY.md is written from these lines.
    """
    path = os.environ.get(FIGURES_ENV_VAR)
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"test": test, **figures}, default=str) + "\n")
