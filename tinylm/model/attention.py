"""Softmax attention: GQA/MQA through SDPA, optional q/k/v/o biases, per-head q/k RMSNorm, partial rotary,
and an optional sigmoid output gate (Qwen3-Next's gated attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.kernels.invariant import attend_key_ranges
from tinylm.model.layers import RMSNorm
from tinylm.model.opaque_ops import gate_by_sigmoid
from tinylm.model.rotary import apply_rotary


class Attention(nn.Module):
    # attend through tinylm::invariant_attention, prefill and decode alike (set by use_batch_invariant)
    batch_invariant = False

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        # Gated attention: q_proj yields, per head, the query then a gate of the same size (Qwen3NextAttention).
        self.output_gate = config.attn_output_gate
        q_size = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(hidden, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            # Qwen3: RMSNorm over each head's vector before rotary (modeling_qwen3.py Qwen3Attention).
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.zero_centered_norm)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.zero_centered_norm)
        self.qk_norm = config.qk_norm
        self.qkv_proj: nn.Module | None = None  # set by fuse_qkv (inference only): one product instead of three
        self.qkv_sizes = (q_size, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)

    def fuse_qkv(self, fused: nn.Module) -> None:
        """Replace q/k/v by one layer whose outputs are theirs concatenated (tinylm.model.fuse)."""
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache=None) -> torch.Tensor:
        """x (B, T, C); cos/sin (B, T, R); mask (B, 1, T, S) bool or None for plain causal; -> (B, T, C)."""
        batch, seq, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = self._query(q)  # (B, T, H, D), (B, T, H*D) or None
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, H_kv, T, D)
        v = v.transpose(1, 2)
        out = self._attend(q, k, v, mask, cache)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        if gate is not None:
            out = gate_by_sigmoid(gate, out, self.batch_invariant)
        return self.o_proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                cache) -> torch.Tensor:
        """q (B, H, T, D), the new k/v (B, H_kv, T, D), through the cache when there is one -> (B, H, T, D)."""
        seq = q.shape[2]
        if seq == 1 and hasattr(cache, "decode_attention"):
            out = cache.decode_attention(self.layer_idx, q, k, v, mask)  # the paged pool's own kernel, if built
            if out is not None:
                return out
        if seq > 1 and getattr(cache, "batch_invariant", False):
            out = cache.prefill_attention(self.layer_idx, q, k, v, mask)  # what decode_attention gives per token
            if out is not None:
                return out
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D)
        if self.batch_invariant and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256:  # the kernel's head sizes
            return invariant_attend(q, k, v, mask)
        if seq == 1 and torch.compiler.is_compiling():
            return _decode_attention(q, k, v, mask)  # Inductor fuses it; SDPA's CPU kernel is slow on one query
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def _query(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q_proj's output (B, T, q_size) -> query (B, T, H, D) and the output gate (B, T, H*D) or None."""
        batch, seq, _ = projected.shape
        if not self.output_gate:
            return projected.view(batch, seq, self.num_heads, self.head_dim), None
        q, gate = projected.view(batch, seq, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        return q, gate.reshape(batch, seq, self.num_heads * self.head_dim)


def invariant_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, T, D) at the last T of S positions, k/v (B, H_kv, S, D), mask (B, 1, T, S) bool or None (causal)
    -> (B, H, T, D) through tinylm::invariant_attention, the operations the engine's paged prefill and decode use:
    `llm.forward` then scores a token with the bits the engine decoded it with. K/V are laid out as a pool of
    B * S rows; each query attends the contiguous keys [start, end) its mask row allows (causal over left or right
    padding, or one packed segment); a mask with holes is not such a range and goes to SDPA."""
    batch, heads, steps, dim = q.shape
    context = k.shape[2]
    starts, ends = _key_ranges(mask, batch, steps, context, q.device)  # (B, T) each
    if starts is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != heads)
    keys = k.transpose(1, 2).reshape(batch * context, *k.shape[1:2], dim).contiguous()  # (B*S, H_kv, D) "pool"
    values = v.transpose(1, 2).reshape(batch * context, *v.shape[1:2], dim).contiguous()
    slots = torch.arange(batch * context, device=q.device).view(batch, context)
    return attend_key_ranges(q, keys, values, slots, starts, ends)


def _key_ranges(mask: torch.Tensor | None, batch: int, steps: int, context: int, device
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each query's keys as a range: (B, T) starts and ends, or (None, None) when a mask row is not one range."""
    if mask is None:  # plain causal: query t sits at position S - T + t and sees keys 0..itself
        ends = torch.arange(context - steps + 1, context + 1, device=device).expand(batch, steps)
        return torch.zeros(batch, steps, dtype=torch.long, device=device), ends.contiguous()
    allowed = mask.expand(batch, 1, steps, context)[:, 0]  # (B, T, S)
    starts, ends = _bounds(allowed)
    # Inside torch.compile the check would break the graph (a host sync): a compiled caller must pass only masks
    # that are ranges (causal over left or right padding, packed segments); the scorer's shared few-shot heads are
    # not, and run eagerly (eval/shared_context.py checks with one_range_per_row). Eagerly this sends holes to SDPA.
    if not torch.compiler.is_compiling() and not _is_range(allowed, starts, ends):
        return None, None
    return starts, ends


def one_range_per_row(allowed: torch.Tensor) -> bool:
    """Whether every row of `allowed` (..., S) bool is one contiguous run of allowed keys, as the batch-invariant
    attention reads them (a host sync: callers check before a compiled forward, which cannot)."""
    return _is_range(allowed, *_bounds(allowed))


def _bounds(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed (..., S) bool -> the first allowed key and one past the last (...,) each (every query sees itself)."""
    return allowed.int().argmax(dim=-1), allowed.shape[-1] - allowed.flip(-1).int().argmax(dim=-1)


def _is_range(allowed: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> bool:
    return bool((allowed.sum(dim=-1) == ends - starts).all())


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row, written out for Inductor: q (B, H, 1, D), k/v (B, H_kv, S, D), mask (B, 1, 1, S) bool
    or None -> (B, H, 1, D). The H / H_kv query heads sharing a K/V head are stacked as G rows (GQA).

    Both products are sums over the cache rows' contiguous D axis, not matmuls: Inductor then reads K and V
    where the paged cache keeps them, gather included, in one vectorized loop each. Matmuls need the rows copied
    out first (transposed, in float32): 2x slower at batch 16 and 1.5x at batch 1 (BENCHMARKS.md, issue 5).
    q and the probabilities are stored once; left inline, the rotary embedding would be recomputed per key."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    q = _stored(q.reshape(batch, kv_heads, heads // kv_heads, 1, dim).float().contiguous() * dim ** -0.5)
    scores = (q * k[:, :, None].float()).sum(dim=-1)  # (B, H_kv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = _stored(scores.softmax(dim=-1).transpose(-1, -2).contiguous()).transpose(-1, -2)  # S-major storage
    out = (probs[..., None] * v[:, :, None].float()).sum(dim=-2)  # (B, H_kv, G, D), D the vector axis
    return out.to(v.dtype).reshape(batch, heads, 1, dim)


def _stored(x: torch.Tensor) -> torch.Tensor:
    """x (contiguous), written to memory once by the compiled graph rather than recomputed inside each loop that
    reads it: Inductor inlines cheap producers into their consumers, and a layout request forces the store.
    Compiled graphs only (the prim is Inductor's, registered by tinylm.engine.compiled)."""
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())
