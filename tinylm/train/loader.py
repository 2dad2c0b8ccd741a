"""Batches for the next step made while this step computes: the data never waits on the critical path.

A step's micro-batches are a pure function of its number (data.SampleOrder, data.rank_slice), so a background
thread can collate step k + 1 while step k runs forward and backward (torch releases the GIL in its kernels) and a
resumed run reads exactly what the uninterrupted run read. On CUDA the tensors are pinned, so the copy to the
device is asynchronous.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher:
    def __init__(self, make: Callable[[int], list[dict]], device: torch.device, enabled: bool = True) -> None:
        self.make, self.device = make, device
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinylm-data") if enabled else None
        self.pending: tuple[int, Future] | None = None

    def get(self, step: int) -> list[dict]:
        """Step `step`'s micro-batches (dicts of CPU tensors, pinned on CUDA); starts preparing step + 1."""
        if self.pending is not None and self.pending[0] == step:
            batches = self.pending[1].result()
        else:
            batches = self._prepare(step)
        if self.pool is not None:
            self.pending = (step + 1, self.pool.submit(self._prepare, step + 1))
        return batches

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=self.pin) for k, v in batch.items() if v is not None}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, None

    def _prepare(self, step: int) -> list[dict]:
        batches = self.make(step)
        if self.pin:
            batches = [{k: v.pin_memory() if v is not None else None for k, v in b.items()} for b in batches]
        return batches
