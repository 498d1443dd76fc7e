"""The shipped Hypothesis machine, on every backend and a few pool shapes."""

from __future__ import annotations

import sys

import pytest

from cupystreams import CudaStreamPool
from cupystreams.testing import run_pool_state_machine


@pytest.mark.parametrize(
    "sizes", [(2, 1, 1), (1, 0, 1), (3, 2, 0)], ids=["2-1-1", "1-0-1", "3-2-0"]
)
def test_pool_matches_model(backend: str, sizes: tuple[int, int, int]) -> None:
    compute, comm, high = sizes
    run_pool_state_machine(
        lambda: CudaStreamPool(compute, comm, high, event_pool_size=4, backend=backend)
    )


def test_pool_matches_model_with_a_thread_switch_every_microsecond() -> None:
    """The host streams' workers run beside the machine's thread: with the interpreter
    switching threads every microsecond, any sequence the pool's lock does not
    protect would be interleaved (a free-threaded build runs them at once)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_pool_state_machine(
            lambda: CudaStreamPool(2, 1, 1, event_pool_size=4, backend="host"), max_examples=25
        )
    finally:
        sys.setswitchinterval(previous)


def _messages(error: BaseException) -> list[str]:
    """The messages of ``error`` and, for an exception group, of every member."""
    nested = getattr(error, "exceptions", ())
    return [str(error), *(m for member in nested for m in _messages(member))]


def test_the_machine_catches_waits_that_do_nothing(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order check must fail a pool whose waits order nothing."""
    from hypothesis import Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    from cupystreams.testing import PoolStateMachine

    if backend == "host":
        from cupystreams._backends._host import HostBackend as Backend
    else:
        from cupystreams._backends._cupy import CupyBackend as Backend  # type: ignore[assignment]
    monkeypatch.setattr(Backend, "wait_event", lambda self, stream, event: None)
    # A missing wait shows when the consumer's task runs while the producer's
    # is held back. On a busy machine a worker thread can take longer than the
    # usual hold to wake, so this test holds longer and tries more runs (the
    # first failure ends it: a pool that orders nothing fails within a few).
    monkeypatch.setattr("cupystreams.testing.GATE_SECONDS", 0.01)
    try:
        run_state_machine_as_test(
            lambda: PoolStateMachine(lambda: CudaStreamPool(2, 1, 1, backend=backend)),
            settings=settings(
                max_examples=300,
                stateful_step_count=40,
                deadline=None,
                phases=[Phase.generate],  # finding it is the point; shrinking only costs time
                database=None,
            ),
        )
    except BaseException as error:  # an AssertionError, or a group of several
        messages = _messages(error)
    else:
        pytest.fail("the machine passed a pool whose waits order nothing")
    assert any("a wait did not order tasks" in m for m in messages), messages
