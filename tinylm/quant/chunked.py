"""The chunked MLP, and splitting linear layers (float or quantized) along their rows or columns.

ChunkedMLP runs SwiGLU by chunks of the intermediate features: since down(h) = sum_c down[:, c](h[:, c]),
down(silu(gate(x)) * up(x)) = sum_c down_c(silu(gate_c(x)) * up_c(x)), so a prefill of T tokens holds (T, chunk)
temporaries instead of three (T, intermediate) ones. A float nn.Linear is split here; a quantized layer splits
itself (`split_rows` / `split_cols`, tinylm/quant/formats.py: int8 row pieces are views, int4 ones repacked). The
inverse of a row split, joining rows, is tinylm.model.fuse.concat_rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.errors import ConfigError
from tinylm.model.fuse import linear_from
from tinylm.model.layers import MLP
from tinylm.quant.formats import Bounds
from tinylm.quant.memory import trim


class ChunkedMLP(nn.Module):
    """x (..., C) -> (..., C): the same SwiGLU as tinylm.model.layers.MLP, one intermediate chunk at a time."""

    def __init__(self, gates: list[nn.Module], ups: list[nn.Module], downs: list[nn.Module]) -> None:
        super().__init__()
        self.gate_chunks, self.up_chunks, self.down_chunks = (nn.ModuleList(m) for m in (gates, ups, downs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for gate, up, down in zip(self.gate_chunks, self.up_chunks, self.down_chunks):
            part = down(F.silu(gate(x)) * up(x))  # (..., C) from (..., chunk) temporaries
            out = part if out is None else out + part
        return out


def chunk_mlps(model: nn.Module, chunk: int) -> None:
    """Replace every SwiGLU MLP (dense or expert) wider than `chunk` by a ChunkedMLP, in place. Only the model's
    own MLP class is known to be plain SwiGLU (`type(m) is MLP`)."""
    names = [n for n, m in model.named_modules() if type(m) is MLP and m.gate_proj.out_features > chunk]
    for name in names:  # by name, so each replaced MLP is freed before the next is split
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, chunked_mlp(model.get_submodule(name), chunk, name))
        trim()


def chunked_mlp(mlp: nn.Module, chunk: int, name: str = "mlp") -> ChunkedMLP:
    inter = mlp.gate_proj.out_features
    group = getattr(mlp.down_proj, "group_size", None) or 1
    if chunk % group:
        raise ConfigError(f"mlp_chunk {chunk} is not a multiple of the group size {group} of {name}.down_proj")
    bounds = [(s, min(s + chunk, inter)) for s in range(0, inter, chunk)]
    return ChunkedMLP(split_rows(mlp.gate_proj, bounds), split_rows(mlp.up_proj, bounds),
                      split_cols(mlp.down_proj, bounds))


def split_rows(module: nn.Module, bounds: Bounds) -> list[nn.Module]:
    """Pieces computing output rows [a, b) each."""
    if isinstance(module, nn.Linear):
        return [linear_from(module.weight[a:b], _part(module.bias, a, b)) for a, b in bounds]
    return module.split_rows(bounds)


def split_cols(module: nn.Module, bounds: Bounds) -> list[nn.Module]:
    """Pieces taking input features [a, b) each; their outputs sum to the whole (the bias goes to the first)."""
    if isinstance(module, nn.Linear):
        biases = [module.bias] + [None] * (len(bounds) - 1)
        return [linear_from(module.weight[:, a:b].contiguous(), bias) for (a, b), bias in zip(bounds, biases)]
    return module.split_cols(bounds)


def _part(bias: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if bias is None else bias[a:b]
