"""Sparse mixture of experts (Qwen3-MoE, Qwen3-Next): softmax router, top-k, optional renormalization, SwiGLU
experts, and optionally a shared expert behind a sigmoid gate (Qwen3NextSparseMoeBlock).

Follows transformers' Qwen3MoeTopKRouter / Qwen3MoeExperts; experts keep the checkpoint's per-expert names
(`mlp.experts.N.gate_proj`, `mlp.shared_expert.gate_proj`, `mlp.shared_expert_gate`) so the weights load as the
hub stores them and as transformers 5's save_pretrained writes them (it un-fuses its 3D expert tensors on save).

Two forms of the same block. Eagerly (prefill, training) tokens are grouped by expert: one product per expert
used, over its tokens. Inside torch.compile (decode steps) that loop has data-dependent shapes, so after
`stack_experts` (inference only) each (token, chosen expert) pair is a product against its expert's rows picked
from (E, 2I, C) and (E, C, I) stacks: Inductor fuses the pick into the product's reduction, so a step reads only
the chosen experts' weights, once per pair (a decode batch of B rows and top-k reads B * k expert matrices).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.kernels.invariant import invariant_linear, invariant_silu_mul, kernels_take
from tinylm.model.layers import MLP
from tinylm.model.opaque_ops import gate_by_sigmoid

# The router and the shared-expert gate (module name patterns): a few KB that decide routing, kept in the model's
# float dtype by quantization policies and by bfloat16 weight storage (float32 in GGUF files too)
ROUTING_LAYERS = ("*.mlp.gate", "*.shared_expert_gate")


def routes_tokens(module_name: str) -> bool:
    """Whether the linear layer `module_name` is a MoE router or shared-expert gate (ROUTING_LAYERS)."""
    return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in ROUTING_LAYERS)


def is_routed_expert(module_name: str) -> bool:
    """Whether the linear layer `module_name` belongs to a routed expert (`mlp.experts.N.*`): those stay plain
    nn.Linear, stacked for the compiled step and the expert kernel (stack_experts)."""
    return ".experts." in module_name


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> (weights (N, k) in the logits' dtype, expert indices (N, k))."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


class SparseMoE(nn.Module):
    # use_batch_invariant: route and sum the experts through `invariant_experts`, one body eagerly and compiled
    batch_invariant = False

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

        # set by stack_experts (inference only), not saved: (E, 2I, C) and (E, C, I)
        self.register_buffer("gate_up_stack", None, persistent=False)
        self.register_buffer("down_stack", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): each token is the weighted sum of its top-k experts' outputs. Eagerly a
        token's sum runs over its experts in index order whatever other tokens chose: batch invariant."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, C)
        if self.batch_invariant and self.gate_up_stack is not None:
            out = self._invariant_experts(tokens)
        else:
            weights, experts = route(self.gate(tokens), self.top_k, self.normalize)
            if self.gate_up_stack is not None and torch.compiler.is_compiling():
                out = self._picked_experts(tokens, weights, experts)
            else:
                out = self._grouped_experts(tokens, weights, experts)
        if self.has_shared:
            # Every token also goes through the shared expert, scaled by its own sigmoid gate (N, 1).
            gated = gate_by_sigmoid(self.shared_expert_gate(tokens), self.shared_expert(tokens), self.batch_invariant)
            out = out + gated
        return out.reshape(shape)

    def _invariant_experts(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, C) -> (N, C): without gradients tinylm::invariant_moe_experts (the same steps in C++,
        tinylm/kernels/invariant_experts.cpp), else `invariant_experts`, eagerly as it is, compiled as an opaque op."""
        if kernels_take(tokens):
            return torch.ops.tinylm.invariant_moe_experts(tokens, self.gate(tokens), self.gate_up_stack,
                                                          self.down_stack, self.top_k, self.normalize)
        experts = invariant_experts
        if torch.compiler.is_compiling():
            experts = torch.ops.tinylm.invariant_experts
        return experts(tokens, self.gate(tokens), self.gate_up_stack, self.down_stack, self.top_k, self.normalize)

    def _grouped_experts(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """tokens (N, C), weights and experts (N, k) -> (N, C): one product per expert in use, over its tokens."""
        return grouped_sum(tokens, weights, experts, lambda expert_idx, rows: self.experts[expert_idx](rows))

    def _picked_experts(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same sum with static shapes (for torch.compile): every (token, slot) pair's expert rows picked from
        the stacks inside the product, float32 products and sums cast back where the eager layers round."""
        dtype = tokens.dtype
        x = tokens.float()[:, None, None, :]  # (N, 1, 1, C)
        gate_up = (self.gate_up_stack[experts].float() * x).sum(-1).to(dtype)  # (N, k, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = (F.silu(gate) * up).float()[:, :, None, :]  # (N, k, 1, I)
        down = (self.down_stack[experts].float() * hidden).sum(-1).to(dtype)  # (N, k, C)
        return (down * weights[..., None]).sum(dim=1)  # (N, C)

    def stack_experts(self) -> bool:
        """Stack the experts' fused gate/up and down weights for the compiled form; each expert's weights become
        views of the stacks (no second copy). False (nothing changed) unless every expert is a float SwiGLU with
        fused gate/up (tinylm.model.fuse) and no bias."""
        layers = [(e.gate_up_proj, e.down_proj) for e in self.experts]
        if not all(plain_linear(layer) for pair in layers for layer in pair):
            return False
        self.gate_up_stack = torch.stack([gate_up.weight.detach() for gate_up, _ in layers])
        self.down_stack = torch.stack([down.weight.detach() for _, down in layers])
        for i, (gate_up, down) in enumerate(layers):
            gate_up.weight = nn.Parameter(self.gate_up_stack[i], requires_grad=False)
            down.weight = nn.Parameter(self.down_stack[i], requires_grad=False)
        return True


def plain_linear(layer) -> bool:
    """A float nn.Linear (or a subclass with the same parameters) without bias: what the stacks can hold."""
    return (isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.is_floating_point())


def invariant_experts(tokens: torch.Tensor, router_logits: torch.Tensor, gate_up_stack: torch.Tensor,
                      down_stack: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
    """The grouped sum with tinylm's invariant products, for batch-invariant inference: tokens (N, C), router
    logits (N, E), stacks (E, 2I, C) and (E, C, I) -> (N, C). Each token's expert outputs are each its own rows'
    products (the kernels' rows do not depend on the other tokens an expert got) added in expert index order."""
    def expert(expert_idx: int, rows: torch.Tensor) -> torch.Tensor:  # rows (n, C) -> (n, C)
        gate, up = invariant_linear(rows, gate_up_stack[expert_idx]).chunk(2, dim=-1)
        return invariant_linear(invariant_silu_mul(gate, up), down_stack[expert_idx])

    weights, experts = route(router_logits, top_k, normalize)
    return grouped_sum(tokens, weights, experts, expert)


def grouped_sum(tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, run_expert) -> torch.Tensor:
    """tokens (N, C), weights and experts (N, k), run_expert(expert index, rows (n, C)) -> (n, C): each token's
    weighted sum of its experts' outputs (N, C), one call per expert in use over its tokens, added in expert order."""
    out = torch.zeros_like(tokens)
    for expert_idx in torch.unique(experts).tolist():
        token_idx, slot = torch.where(experts == expert_idx)
        expert_out = run_expert(expert_idx, tokens[token_idx]) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, expert_out.to(out.dtype))
    return out


@torch.library.custom_op("tinylm::invariant_experts", mutates_args=())
def _invariant_experts_op(tokens: torch.Tensor, router_logits: torch.Tensor, gate_up_stack: torch.Tensor,
                          down_stack: torch.Tensor, top_k: int, normalize: bool) -> torch.Tensor:
    return invariant_experts(tokens, router_logits, gate_up_stack, down_stack, top_k, normalize)


@_invariant_experts_op.register_fake
def _(tokens, router_logits, gate_up_stack, down_stack, top_k, normalize):
    return torch.empty_like(tokens)
