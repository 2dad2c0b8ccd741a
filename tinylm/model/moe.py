"""Sparse mixture of experts (Qwen3-MoE, Qwen3-Next): softmax router, top-k, optional renormalization, SwiGLU
experts, and optionally a shared expert behind a sigmoid gate (Qwen3NextSparseMoeBlock).

Follows transformers' Qwen3MoeTopKRouter / Qwen3MoeExperts; experts keep the checkpoint's per-expert names
(`mlp.experts.N.gate_proj`, `mlp.shared_expert.gate_proj`, `mlp.shared_expert_gate`) so the weights load as the
hub stores them and as transformers 5's save_pretrained writes them (it un-fuses its 3D expert tensors on save).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.model.layers import MLP


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> (weights (N, k) in the logits' dtype, expert indices (N, k))."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.has_shared = config.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): each token is the weighted sum of its top-k experts' outputs."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, C)
        weights, experts = route(self.gate(tokens), self.top_k, self.normalize)
        out = torch.zeros_like(tokens)
        for expert_idx in torch.unique(experts).tolist():
            token_idx, slot = torch.where(experts == expert_idx)
            expert_out = self.experts[expert_idx](tokens[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, expert_out.to(out.dtype))
        if self.has_shared:
            # Every token also goes through the shared expert, scaled by its own sigmoid gate (N, 1).
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.reshape(shape)
