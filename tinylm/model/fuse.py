"""Fused projections for inference: q/k/v as one matmul, gate/up as one, float or quantized alike.

At batch 1 a projection is a matrix-vector product that pays a fixed cost per call; three (q, k, v) or two (gate,
up) become one over the concatenated rows, reading the same bytes. Applied after loading and quantization (the
policies name q_proj/k_proj/v_proj), and only for inference: a fused model's state dict no longer reads like the
checkpoint, so it is never saved (`tinylm quantize` and training work on unfused models). Mixture-of-experts
blocks also get their experts' weights stacked (tinylm/model/moe.py), for the compiled decode step.

Joining rows is the layer class's business: a float nn.Linear is joined here; any other class joins its own with
its classmethod `concat_rows(layers)` (the quantized formats of tinylm/quant/formats.py), so this module knows no
quantized layer.
"""

from __future__ import annotations

import torch
from torch import nn

from tinylm.errors import ConfigError
from tinylm.model.attention import Attention
from tinylm.model.layers import MLP
from tinylm.model.moe import SparseMoE


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention's q/k/v and every MLP's gate/up (experts included) in place, then stack each MoE
    block's experts; returns the number of fusions. Layers a mixed-precision policy stores in different schemes
    are left unfused."""
    fused = 0
    for module in list(model.modules()):
        if isinstance(module, Attention) and module.qkv_proj is None:
            fused += _try(module.fuse_qkv, [module.q_proj, module.k_proj, module.v_proj])
        elif type(module) is MLP and module.gate_up_proj is None:
            fused += _try(module.fuse_gate_up, [module.gate_proj, module.up_proj])
    for module in model.modules():
        if isinstance(module, SparseMoE) and module.gate_up_stack is None:
            module.stack_experts()
    return fused


def _try(install, layers: list[nn.Module]) -> int:
    try:
        install(concat_rows(layers))
    except ConfigError:  # different schemes (e.g. q/k/v kept in bf16, the rest int4): keep them apart
        return 0
    return 1


def concat_rows(layers: list[nn.Module]) -> nn.Module:
    """One layer computing the concatenated outputs of `layers` (N1 + N2 + ... output features), of one class and
    the same in_features; ConfigError when they cannot be joined."""
    first = layers[0]
    if any(type(m) is not type(first) for m in layers):
        raise ConfigError("concat_rows: the layers differ in scheme")
    if isinstance(first, nn.Linear):  # float (GemvLinear too): a plain nn.Linear over the stacked weights
        return linear_from(torch.cat([m.weight for m in layers]), concat_biases(layers))
    concat = getattr(type(first), "concat_rows", None)
    if concat is None:
        raise ConfigError(f"concat_rows: {type(first).__name__} layers cannot be joined")
    return concat(layers)


def concat_biases(layers: list[nn.Module]) -> torch.Tensor | None:
    """The layers' biases end to end, (N1 + N2 + ...,), zeros for a layer without one; None when none has one."""
    biases = [m.bias for m in layers]
    if all(b is None for b in biases):
        return None
    dtype = next(b for b in biases if b is not None).dtype
    return torch.cat([b if b is not None else torch.zeros(m.out_features, dtype=dtype)
                      for m, b in zip(layers, biases)])


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An inference nn.Linear holding `weight` (N, K) and `bias` (N,) as they are (no init, no copy)."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer
