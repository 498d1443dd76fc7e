"""What every framework adapter promises alike, checked once per framework."""

from __future__ import annotations

import gc
import importlib
import sys
import weakref

import pytest

from cupystreams import CudaStreamPool


@pytest.mark.parametrize("framework", ["torch", "jax", "numba"])
def test_import_without_the_framework_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"cupystreams.adapters.{framework}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install cupystreams\[{framework}\]"):
        importlib.import_module(f"cupystreams.adapters.{framework}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("framework", "convert"),
    [
        pytest.param("torch", "as_torch_stream", marks=pytest.mark.requires_module("torch")),
        pytest.param("numba", "as_numba_stream", marks=pytest.mark.requires_module("numba")),
    ],
)
def test_the_cache_keeps_no_pool_stream_alive(framework: str, convert: str) -> None:
    adapter = importlib.import_module(f"cupystreams.adapters.{framework}")
    pool = CudaStreamPool(1, 0, 0, backend="cupy")
    lease = pool.acquire_compute()
    getattr(adapter, convert)(lease)
    stream_ref = weakref.ref(lease.cupy_stream)
    lease.release()
    pool.close()
    del lease, pool
    gc.collect()
    assert stream_ref() is None, "the adapter's cache kept a closed pool's stream alive"
