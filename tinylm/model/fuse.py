"""Fused projections for inference: q/k/v as one matmul, gate/up as one, float or quantized alike.

At batch 1 a projection is a matrix-vector product that pays a fixed cost per call; three (q, k, v) or two (gate,
up) become one over the concatenated rows, reading the same bytes. Applied after loading and quantization (the
policies name q_proj/k_proj/v_proj), and only for inference: a fused model's state dict no longer reads like the
checkpoint, so it is never saved (`tinylm quantize` and training work on unfused models). Mixture-of-experts
blocks also get their experts' weights stacked (tinylm/model/moe.py), for the compiled decode step.
"""

from __future__ import annotations

from torch import nn

from tinylm.errors import ConfigError
from tinylm.model.attention import Attention
from tinylm.model.layers import MLP
from tinylm.model.moe import SparseMoE
from tinylm.quant.chunked import concat_rows


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
