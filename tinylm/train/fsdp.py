"""FSDP2 (torch.distributed.fsdp.fully_shard): weights, gradients and AdamW state sharded over the processes.

Each decoder layer is one FSDP unit (its weights gathered just before its forward and its backward, freed after);
the objective module is the root unit, holding the embedding, the final norm and the output head (tied or not), so
the chunked loss reads the head's gathered weight inside the root's forward. Gradients are reduce-scattered as a
mean over processes, as DDP averages them: the trainer's loss scaling is the same for both.

Checkpoints stay consolidated: every process takes part in gathering each tensor whole (`full_tensor`, one
tensor at a time), the main process writes the same files a single process writes (model.safetensors, the index-
keyed optimizer state), and a resume on any number of processes, sharded or not, loads them and shards them again
(`shard_like`). The exported Hugging Face folder is therefore the one a single process exports.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(objective: nn.Module, model: nn.Module) -> None:
    """Shard in place: every decoder layer, then the objective (root: embedding, norm, head)."""
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(objective)


def full_tensor(value, main: bool):
    """A DTensor gathered whole (a collective: every process calls it), kept on the CPU on the main process only."""
    if not isinstance(value, DTensor):
        return value
    whole = value.full_tensor()
    return whole.cpu() if main else None


def full_state(module: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """module.state_dict() with every sharded tensor whole; {} on other processes."""
    state = {name: full_tensor(t, main) for name, t in module.state_dict().items()}
    return state if main else {}


def full_optimizer_state(optimizer: torch.optim.Optimizer, main: bool) -> dict:
    """optimizer.state_dict() (index-keyed, as one process saves it) with every sharded tensor whole."""
    state = optimizer.state_dict()
    entries = {index: {k: full_tensor(v, main) for k, v in entry.items()} for index, entry in state["state"].items()}
    return {"state": entries, "param_groups": state["param_groups"]} if main else {}


def shard_like(value: torch.Tensor, reference) -> torch.Tensor:
    """A whole tensor (read from a checkpoint by every process) placed as `reference` is placed: sharded when
    `reference` is a DTensor, unchanged otherwise."""
    if not isinstance(reference, DTensor):
        return value
    value = value.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)


def describe(model: nn.Module, world: int) -> str:
    """One line for the run log: how many parameter elements this process holds of the whole."""
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    return f"FSDP2 over {world} processes: this process holds {local:,} of {total:,} parameter elements"


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float: over DTensor gradients it is a (replicated) DTensor."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
