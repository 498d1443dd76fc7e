"""A toy device for the host backend: SMs that run kernel blocks by priority.

A GPU runs the blocks of concurrent kernels on a fixed number of SMs; when an
SM frees up, the block scheduler picks from the most urgent stream priority
first. ``SimDevice`` models exactly that with host threads, so a flood of
normal work and one urgent request behave on the host backend as they do on a
GPU (urgent work waits for a block, not for the flood), only slower.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

__all__ = ["SimDevice"]


class _Kernel:
    __slots__ = ("done", "left", "lock")

    def __init__(self, blocks: int) -> None:
        self.left = blocks
        self.lock = threading.Lock()
        self.done = threading.Event()


class SimDevice:
    """``sms`` worker threads running kernel blocks, lowest priority number first.

    Priorities are CUDA's numbers: lower is more urgent. Among equal
    priorities blocks run in launch order.
    """

    def __init__(self, sms: int = 4) -> None:
        self._queue: list[tuple[int, int, float, _Kernel]] = []
        self._ready = threading.Condition()
        self._order = itertools.count()
        self._stopped = False
        self._workers = [
            threading.Thread(target=self._work, name=f"sim-sm-{i}", daemon=True) for i in range(sms)
        ]
        for worker in self._workers:
            worker.start()

    def run_kernel(self, priority: int, blocks: int, block_s: float) -> None:
        """Queue ``blocks`` blocks of ``block_s`` seconds each and wait for them.

        Called from a host stream's worker (through ``launch_host_func``), so
        the stream stays busy until its kernel finished, as on a GPU.
        """
        kernel = _Kernel(blocks)
        with self._ready:
            for _ in range(blocks):
                heapq.heappush(self._queue, (priority, next(self._order), block_s, kernel))
            self._ready.notify_all()
        kernel.done.wait()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopped:
                    self._ready.wait()
                if self._stopped:
                    return
                _, _, block_s, kernel = heapq.heappop(self._queue)
            time.sleep(block_s)
            with kernel.lock:
                kernel.left -= 1
                if kernel.left == 0:
                    kernel.done.set()

    def close(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join()
