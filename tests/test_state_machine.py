"""The shipped Hypothesis machine, on every backend and a few pool shapes."""

from __future__ import annotations

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
