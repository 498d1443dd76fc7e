"""The kernel that gathers a copy group's results into one device buffer.

On the CPU: which results one launch takes, and that a kernel CuPy cannot
compile leaves the copies to one at a time, for good. On a GPU: every word
size it picks, more sources than one launch takes, a stride that leaves
gaps (a lease's share of a group), results of no bytes, and a pipeline whose
results have odd sizes; each compared with the bytes copied one by one on
the host.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupystreams import CudaStreamPool, _gather_kernel
from cupystreams._gather_kernel import batch_length
from cupystreams.pipeline import Pipeline


def test_one_launch_takes_the_leading_results_of_one_size_evenly_spaced() -> None:
    assert batch_length([8, 8, 8, 8], [0, 4, 8, 12], [0] * 4) == 4
    assert batch_length([8, 8, 8, 5], [0, 4, 8, 12], [0] * 4) == 3  # the run's shorter last
    assert batch_length([8, 5, 8], [0, 4, 8], [0] * 3) == 1  # never past a result it skips
    assert batch_length([8, 8, 8], [0, 4, 9], [0] * 3) == 2  # uneven rows end the batch
    assert batch_length([8, 8, 8], [0, 4, 8], [0, 0, 1]) == 2  # another device's result
    assert batch_length([8], [3], [0]) == 1
    assert batch_length([], [], []) == 0


def test_a_kernel_that_cannot_be_compiled_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NVRTC, grouped runs copy one result at a time instead of failing."""
    import sys
    import types

    attempts: list[str] = []

    def refuse(**_: object) -> None:
        attempts.append("compile")
        raise RuntimeError("libnvrtc not found")

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=refuse))
    monkeypatch.setattr(_gather_kernel, "_kernels", None)
    monkeypatch.setattr(_gather_kernel, "_loaded", frozenset())
    monkeypatch.setattr(_gather_kernel, "_failed", None)
    assert _gather_kernel.ready(0) is False
    assert _gather_kernel.ready(0) is False
    assert _gather_kernel.ready(1) is False
    assert attempts == ["compile"]
    assert "libnvrtc not found" in str(_gather_kernel._failed)


def _gather_and_compare(count: int, nbytes: int, offset: int, spacing: int) -> None:
    """Gather ``count`` random sources of ``nbytes`` into a buffer, ``offset`` bytes in,
    one every ``spacing`` bytes, and check every byte, the gaps included."""
    import cupy

    assert _gather_kernel.ready(cupy.cuda.runtime.getDevice())
    rng = np.random.default_rng(count * 1000 + nbytes + offset)
    host = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(count)]
    # Each source one byte into its allocation when offset is odd: unaligned too.
    sources = [cupy.asarray(np.concatenate([[0] * (offset % 2), h]).astype(np.uint8)) for h in host]
    pointers = [s.data.ptr + offset % 2 for s in sources]
    size = offset + spacing * (count - 1) + nbytes + 64
    into = cupy.full(size, 0xAB, dtype=np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    _gather_kernel.gather(into.data.ptr + offset, spacing, pointers, nbytes, stream)
    stream.synchronize()
    expected = np.full(size, 0xAB, dtype=np.uint8)
    for k, h in enumerate(host):
        expected[offset + k * spacing : offset + k * spacing + nbytes] = h
    assert np.array_equal(into.get(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("count", "nbytes", "offset", "spacing"),
    [
        (2, 1 << 20, 0, 1 << 20),  # 16-byte words, back to back
        (8, 4096 + 8, 8, 4096 + 8),  # 8-byte words
        (3, 1000, 4, 1000),  # 4-byte words
        (5, 334, 2, 334),  # 2-byte words
        (4, 333, 1, 333),  # single bytes, unaligned source and destination
        (40, 4096, 0, 4096),  # more sources than one launch takes
        (6, 1 << 16, 0, 3 << 16),  # a lease's share: every third chunk's place
        (3, 0, 0, 0),  # results of no bytes: nothing to copy
    ],
)
def test_gpu_gather_copies_every_byte_to_its_place(
    count: int, nbytes: int, offset: int, spacing: int
) -> None:
    _gather_and_compare(count, nbytes, offset, spacing)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.int8, np.float16, np.float64])
def test_gpu_a_pipeline_gathers_results_of_odd_sizes(gpu_pool: CudaStreamPool, dtype: type) -> None:
    """Rows of 3 elements of 1, 2 and 8 bytes: gathered by every word size."""
    pipe = Pipeline(gpu_pool, lambda x: (x[:, :3] * 3).astype(dtype), chunk_bytes=7 * 16)
    data = np.arange(101 * 4, dtype=np.float32).reshape(101, 4) % 37
    expected = (data[:, :3] * 3).astype(dtype)
    assert np.array_equal(pipe.run(data), expected)
    out = np.zeros((101, 3), dtype=dtype)
    assert np.array_equal(pipe.run(data, out), expected)
    assert np.array_equal(pipe.run_serial(data), expected)


@pytest.mark.gpu
def test_gpu_a_pipeline_gathers_rows_of_no_bytes(gpu_pool: CudaStreamPool) -> None:
    pipe = Pipeline(gpu_pool, lambda x: x[:, :0], chunk_bytes=64)
    data = np.ones((50, 4), dtype=np.float32)
    assert pipe.run(data).shape == (50, 0)
