"""Small building blocks shared by every family: RMSNorm (plain, zero-centred, gated) and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.kernels.invariant import invariant_rms_norm, invariant_silu_mul, kernel_takes


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as transformers' LlamaRMSNorm).

    zero_centered (Qwen3-Next): the stored weight w is applied as (1 + w), in float32 before the cast back, as
    Qwen3NextRMSNorm does (transformers/models/qwen3_next/modeling_qwen3_next.py, PR #29402 for the order).
    batch_invariant (use_batch_invariant): the same formula in tinylm's row kernel, one call eagerly and compiled.
    """

    batch_invariant = False

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.eps = eps
        self.zero_centered = zero_centered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and kernel_takes(x) and self.weight.dtype == x.dtype:
            return invariant_rms_norm(x, self.weight, self.eps, self.zero_centered)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet's output norm: RMSNorm(x) * weight, then * silu(gate) in float32 (Qwen3NextRMSNormGated)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x, gate (..., dim) -> (..., dim) in x's dtype."""
        return gated_rms_norm(x, gate, self.weight, self.eps)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """GatedRMSNorm's formula as a function (Gated DeltaNet's mixing op calls it with the module's weight)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * x32.to(dtype)) * F.silu(gate.float())).to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). (B, T, C) -> (B, T, C). batch_invariant (use_batch_invariant): the
    product silu(gate) * up in tinylm's row kernel, the same code eagerly and compiled."""

    batch_invariant = False

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_gate_up (inference only)

    def fuse_gate_up(self, fused: nn.Module) -> None:
        """Replace gate/up by one layer computing [gate; up] (tinylm.model.fuse)."""
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._act(gate, up))

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and kernel_takes(gate) and up.stride(-1) == 1:
            return invariant_silu_mul(gate, up)
        return F.silu(gate) * up
