"""The kernel that gathers a copy group's results into one device buffer.

Every word size it picks, more sources than one launch takes, a stride that
leaves gaps (a lease's share of a group) and a pipeline whose results have
odd sizes; each compared with the bytes copied one by one on the host.
"""

from __future__ import annotations

import numpy as np
import pytest

from cupystreams import CudaStreamPool
from cupystreams.pipeline import Pipeline

pytestmark = pytest.mark.gpu


def _gather_and_compare(count: int, nbytes: int, offset: int, spacing: int) -> None:
    """Gather ``count`` random sources of ``nbytes`` into a buffer, ``offset`` bytes in,
    one every ``spacing`` bytes, and check every byte, the gaps included."""
    import cupy

    from cupystreams import _gather_kernel

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
    ],
)
def test_gpu_gather_copies_every_byte_to_its_place(
    count: int, nbytes: int, offset: int, spacing: int
) -> None:
    _gather_and_compare(count, nbytes, offset, spacing)


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
