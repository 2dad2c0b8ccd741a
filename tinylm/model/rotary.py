"""Rotary position embeddings with the scaling variants transformers implements (modeling_rope_utils.py).

Frequencies are computed in float32 exactly as the reference does, so fp32 logits match to rounding.
"""

from __future__ import annotations

import math

import torch

from tinylm.config import ModelConfig


def inverse_frequencies(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq (rotary_dim/2,) float32, attention scaling applied to cos/sin)."""
    dim = config.rotary_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    if rope_type == "dynamic":
        base = _dynamic_ntk_base(config, base, dim, scaling["factor"], seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "yarn":
        return _yarn(config, scaling, base, dim)
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _dynamic_ntk_base(config: ModelConfig, base: float, dim: int, factor: float, seq_len: int | None) -> float:
    """NTK-aware base that grows once the sequence passes max_position_embeddings."""
    max_len = config.max_position_embeddings
    seq_len = max(seq_len or max_len, max_len)
    return base * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))


def _yarn(config: ModelConfig, scaling: dict, base: float, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): interpolate low frequencies, keep high ones, ramp between; scale attention."""
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, smooth in between."""
    factor = scaling["factor"]
    low_factor, high_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_factor, old_len / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Computes (cos, sin) for given positions; not an nn.Module so meta-device construction needs no care."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.dynamic = (config.rope_scaling or {}).get("rope_type") == "dynamic"
        # Built on the CPU even inside a `torch.device("meta")` block: these are computed, never loaded.
        with torch.device("cpu"):
            self.inv_freq, self.attention_scaling = inverse_frequencies(config)
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (P, R) for every position (use_table)

    def use_table(self, dtype: torch.dtype, device) -> None:
        """Compute cos and sin once for every position the model takes, in blocks of fixed size, and read them by
        position from then on (batch-invariant inference): a position's values are then the same bits in an eager
        prefill and in a compiled decode step, whose fused cos / sin are not eager's. Dynamic NTK scaling depends
        on the sequence's length: no table (and not invariant)."""
        if self.dynamic:
            return
        block = 1024
        blocks = [self._compute(torch.arange(start, start + block, device=device)[None], dtype)
                  for start in range(0, self.config.max_position_embeddings, block)]
        self.table = tuple(torch.cat([b[i][0] for b in blocks])[:self.config.max_position_embeddings]
                           for i in range(2))

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`."""
        if self.table is not None and self.table[0].dtype == dtype and self.table[0].device == position_ids.device:
            return self.table[0][position_ids], self.table[1][position_ids]
        return self._compute(position_ids, dtype)

    def _compute(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.dynamic:
            with torch.device("cpu"):
                inv_freq, _ = inverse_frequencies(self.config, int(position_ids.max()) + 1)
        inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, R) with R <= D: rotate the first R dims, pass the rest (partial rotary)."""
    cos, sin = cos[:, None], sin[:, None]
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
