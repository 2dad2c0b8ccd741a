"""Splitting and joining linear layers (float or quantized) along their rows or columns, and the chunked MLP.

ChunkedMLP runs SwiGLU by chunks of the intermediate features: since down(h) = sum_c down[:, c](h[:, c]),
down(silu(gate(x)) * up(x)) = sum_c down_c(silu(gate_c(x)) * up_c(x)), so a prefill of T tokens holds (T, chunk)
temporaries instead of three (T, intermediate) ones. Row pieces of int8 weights are views (no copy); int4 pieces are
repacked from the portable values. `concat_rows` is the inverse of a row split: it fuses q/k/v or gate/up layers of
the same scheme into one (for a fused-projection decode path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.errors import ConfigError
from tinylm.quant.linear import HalfLinear, Int4Linear, Int8Linear

Bounds = list[tuple[int, int]]


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
    """Replace every SwiGLU MLP (dense or expert) wider than `chunk` by a ChunkedMLP, in place."""
    from tinylm.model.layers import MLP  # the model's own class: only it is known to be plain SwiGLU

    from tinylm.quant.memory import trim

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
    bias = module.bias
    if isinstance(module, Int8Linear):
        return [Int8Linear(module.qweight[a:b], module.scales[a:b], _part(bias, a, b), **_dtypes(module),
                           input_scale=module.input_scale) for a, b in bounds]
    if isinstance(module, Int4Linear):
        q, scales, zeros = module.portable_parts()
        return [Int4Linear(q[a:b], scales[a:b], zeros[a:b], _part(bias, a, b), **_dtypes(module)) for a, b in bounds]
    return [_float_like(module, module.weight[a:b], _part(bias, a, b)) for a, b in bounds]


def split_cols(module: nn.Module, bounds: Bounds) -> list[nn.Module]:
    """Pieces taking input features [a, b) each; their outputs sum to the whole (the bias goes to the first)."""
    biases = [module.bias] + [None] * (len(bounds) - 1)
    if isinstance(module, Int8Linear):
        group = module.group_size
        scales = (lambda a, b: module.scales) if group is None else (lambda a, b: module.scales[:, a // group:b // group])
        return [Int8Linear(module.qweight[:, a:b], scales(a, b), bias, **_dtypes(module),
                           input_scale=_part(module.input_scale, a, b)) for (a, b), bias in zip(bounds, biases)]
    if isinstance(module, Int4Linear):
        q, s, z = module.portable_parts()
        g = module.group_size
        return [Int4Linear(q[:, a:b], s[:, a // g:b // g], z[:, a // g:b // g], bias, **_dtypes(module))
                for (a, b), bias in zip(bounds, biases)]
    return [_float_like(module, module.weight[:, a:b].contiguous(), bias) for (a, b), bias in zip(bounds, biases)]


def concat_rows(modules: list[nn.Module]) -> nn.Module:
    """One layer computing the concatenated outputs of `modules` (same scheme, in_features, group size)."""
    first = modules[0]
    if any(type(m) is not type(first) or getattr(m, "group_size", None) != getattr(first, "group_size", None)
           or getattr(m, "activations", None) != getattr(first, "activations", None) for m in modules):
        raise ConfigError("concat_rows: the layers differ in scheme, group size or activations")
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.out_features, dtype=first.weight.dtype) for m, b in zip(modules, biases)])
    if isinstance(first, Int8Linear):
        if not all(_same(m.input_scale, first.input_scale) for m in modules):
            raise ConfigError("concat_rows: the int8 layers are smoothed differently")
        return Int8Linear(torch.cat([m.qweight for m in modules]), torch.cat([m.scales for m in modules]), bias,
                          **_dtypes(first), input_scale=first.input_scale)
    if isinstance(first, Int4Linear):
        parts = [m.portable_parts() for m in modules]
        return Int4Linear(*(torch.cat([p[i] for p in parts]) for i in range(3)), bias, **_dtypes(first))
    return _float_like(first, torch.cat([m.weight for m in modules]), bias)


def _dtypes(module) -> dict:
    """The constructor options a part (or a concatenation) of `module` keeps."""
    options = {"dtype": module.dtype, "kernel_dtype": module.kernel_dtype}
    if isinstance(module, Int8Linear):
        options["activations"] = module.activations
    return options


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _part(bias: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if bias is None else bias[a:b]


def _float_like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A float piece of the same kind as `module` (nn.Linear, or HalfLinear with its 16-bit storage)."""
    if isinstance(module, HalfLinear):
        return HalfLinear(weight, bias, module.weight.dtype)
    return _float_linear(weight, bias)


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer
