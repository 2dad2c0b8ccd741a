"""Serving LoRA adapters without merging them: every row of a batch runs the base weights plus its own adapter.

Each Linear an adapter touches is wrapped once in a MultiLoRALinear holding every loaded adapter's (A, B) for it.
Before a forward, the runner sets the shared RowAdapters to each token's adapter id (0: the base model); the layer
adds scale_a * (x_rows @ A_a^T) @ B_a^T for the rows of each adapter a present, so a batch mixes adapters and the
base model, and loading or unloading one never touches the base weights (S-LoRA / vLLM's multi-LoRA, written with
plain matmuls per adapter group). Adapters are PEFT folders, as `tinylm train` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylm.errors import ConfigError
from tinylm.model.block_linear import BlockLinear
from tinylm.weights.lora_files import read_adapter

MAX_ADAPTERS = 64  # loaded at once per engine


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: an adapter by name, id and PEFT folder; the engine loads it on first use and keeps it by name."""

    lora_name: str
    lora_int_id: int = 0  # vLLM's own id; tinylm numbers adapters itself and keeps this for compatibility
    lora_path: str = ""


class RowAdapters:
    """The adapter id of every token of the current forward, (B * T,) int64, or None when all are the base's."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: RowAdapters) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # id -> (A (r, in), B (out, r), s)

    @property
    def weight(self) -> torch.Tensor:  # code that reads a Linear's weight (dtype, device) finds the base's
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): the base product plus, for each adapter in the batch, its rows' update."""
        out = self.base_layer(x)
        ids = self.rows.ids
        if ids is None or not self.adapters:
            return out
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for adapter_id, (a, b, scale) in self.adapters.items():
            rows = (ids == adapter_id).nonzero().squeeze(-1)
            if rows.numel():
                update = (flat_x.index_select(0, rows) @ a.T) @ b.T * scale  # (n, out)
                flat_out.index_add_(0, rows, update.to(flat_out.dtype))
        return flat_out.view(out.shape)


class LoRAAdapters:
    """The adapters an engine's model serves, by name: load (wrapping the Linears they touch), unload, look up."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = RowAdapters()
        self.ids: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self._next_id = 1

    def load(self, name: str, path: str | Path) -> int:
        """Read the PEFT folder at `path` and serve it as `name`; returns its id. WeightsError for a bad folder."""
        if name in self.ids:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        if len(self.ids) >= MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} LoRA adapters can be loaded at once")
        adapter = read_adapter(path, self.model)
        adapter_id = self._next_id
        device, dtype = self.model.lm_head.weight.device, self.model.dtype
        for module_name, (a, b) in adapter.weights.items():
            layer = self._wrapped(module_name)
            layer.adapters[adapter_id] = (a.to(device, dtype), b.to(device, dtype), adapter.scaling)
        self._next_id += 1
        self.ids[name], self.paths[name] = adapter_id, str(path)
        return adapter_id

    def unload(self, name: str) -> int:
        """Stop serving `name`; returns the id it had. KeyError when no such adapter is loaded."""
        adapter_id = self.ids.pop(name)
        self.paths.pop(name)
        for module in self.model.modules():
            if isinstance(module, MultiLoRALinear):
                module.adapters.pop(adapter_id, None)
        return adapter_id

    def set_rows(self, token_adapters: torch.Tensor | None) -> None:
        """Each token of the next forward's (B * T,) adapter id, or None for the base model everywhere."""
        self.rows.ids = token_adapters

    def _wrapped(self, module_name: str) -> MultiLoRALinear:
        parent_name, _, leaf = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        layer = getattr(parent, leaf)
        if isinstance(layer, MultiLoRALinear):
            return layer
        if not isinstance(layer, (nn.Linear, BlockLinear)):
            raise ConfigError(f"{module_name} is not a plain Linear here (fused or quantized): LoRA adapters are "
                              "served on float, unfused models")
        wrapped = MultiLoRALinear(layer, self.rows)
        setattr(parent, leaf, wrapped)
        return wrapped
