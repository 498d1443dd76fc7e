"""The public surface: every name exported, no constructor leaks."""

from __future__ import annotations

import pytest

import cupystreams

FIXED_NAMES = {
    "CudaStreamPool", "StreamLease", "PooledStream", "PooledEvent", "EventPool",
    "StreamPriority", "StreamState", "StreamStats", "PoolStats",
    "get_global_stream_pool", "reset_global_pool",
    "compute_stream", "comm_stream", "high_priority_stream",
    "PoolError", "PoolClosedError", "PoolExhaustedError", "PoolTimeoutError",
    "LeaseError", "BackendUnavailableError",
}  # fmt: skip


def test_every_fixed_name_is_exported() -> None:
    assert set(cupystreams.__all__) >= FIXED_NAMES
    for name in cupystreams.__all__:
        assert hasattr(cupystreams, name), name


def test_error_hierarchy() -> None:
    for name in (
        "PoolClosedError",
        "PoolExhaustedError",
        "PoolTimeoutError",
        "LeaseError",
        "BackendUnavailableError",
    ):
        assert issubclass(getattr(cupystreams, name), cupystreams.PoolError)
    assert issubclass(cupystreams.PoolTimeoutError, TimeoutError)


@pytest.mark.parametrize("cls", ["StreamLease", "PooledStream", "PooledEvent"])
def test_handles_have_no_public_constructor(cls: str) -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        getattr(cupystreams, cls)()


def test_adapters_are_a_subpackage() -> None:
    import cupystreams.adapters

    assert cupystreams.adapters.__name__ == "cupystreams.adapters"


def test_py_typed_is_shipped() -> None:
    from importlib.resources import files

    assert files("cupystreams").joinpath("py.typed").is_file()
