"""Data parallelism over torch.distributed: one process per device, started by torchrun (gloo on CPU, NCCL on GPU).

Without torchrun's environment (WORLD_SIZE unset) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few float64 numbers over processes (metrics, token counts): one small collective."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every process's `obj` (small JSON-able things such as RNG states), on every process."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def any_true(self, flag: bool) -> bool:
        return self.all_reduce_sum([float(flag)])[0] > 0

    def max_int(self, value: int) -> int:
        """The largest of every process's `value` (e.g. which stop signal any rank saw; 0 = none)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return int(tensor.item())


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes; pick this process's device."""
    device_name = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
