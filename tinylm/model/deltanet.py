"""Gated DeltaNet, the linear-attention token mixer of Qwen3-Next's `linear_attention` layers.

in_proj_qkvz / in_proj_ba -> causal depthwise conv (rolling state) + SiLU over q, k, v -> gated delta rule
(decay from A_log and dt_bias, write strength beta) -> gated RMSNorm with z -> out_proj. Module and parameter names
are the checkpoint's (`linear_attn.in_proj_qkvz`, `linear_attn.A_log`, ...). Reference: Qwen3NextGatedDeltaNet in
https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/modeling_qwen3_next.py

Padding: the reference zeroes padded inputs, which keeps a fresh left-padded row equal to the unpadded one but
lets padding decay a state the row continues (and sit between that state and the new tokens in the conv window).
Here padded tokens are moved after the real ones and write nothing, so a padded row equals the unpadded one
with or without a cached state (the serving engine left-pads decode rows next to prefill chunks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.config import ModelConfig
from tinylm.kernels.invariant import kernels_take
from tinylm.model.delta_rule import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from tinylm.model.layers import GatedRMSNorm, gated_rms_norm


class GatedDeltaNet(nn.Module):
    # use_batch_invariant: prompts run the recurrent form token by token, as decode steps do (the chunked form sums
    # in another order): without gradients tinylm::invariant_deltanet_mix, else mix_tokens' PyTorch form
    batch_invariant = False

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim  # q, k and v go through the conv; z, b, a do not
        kernel = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        self.in_proj_qkvz = nn.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, padding=kernel - 1,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))  # decay rate log(A); loaded or set by the init
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """One sequence's (conv state (conv_dim, kernel-1), recurrent state (H_v, D_k, D_v)) shapes."""
        return ((self.conv_dim, self.conv1d.weight.shape[-1] - 1),
                (self.num_v_heads, self.head_k_dim, self.head_v_dim))

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x (B, T, C); pad_mask (B, T), 0 at padding, or None; cache with linear_state / set_linear_state."""
        batch, seq, _ = x.shape
        order = None
        if pad_mask is not None:
            order, pad_mask = _real_tokens_first(pad_mask)
            x = (_take(x, order) * pad_mask[:, :, None]).to(x.dtype)  # zeroed as the reference does
        state = cache.linear_state(self.layer_idx) if cache is not None else None
        conv_state, recurrent_state = state if state is not None else (None, None)
        qkv, z, b, a = self._project(x)
        lengths = None if pad_mask is None else pad_mask.sum(dim=1).long()  # (B,) real tokens per row
        if self.batch_invariant and kernels_take(qkv):
            # the whole mixing as one C++ call (tinylm/kernels/deltanet_mix.cpp), eagerly and compiled alike
            out, conv_state, recurrent_state = torch.ops.tinylm.invariant_deltanet_mix(
                qkv, z, b, a, conv_state, recurrent_state, lengths, self.conv1d.weight, self.A_log, self.dt_bias,
                self.norm.weight, self.norm.eps, self.num_k_heads, self.head_k_dim)
        else:
            mix = mix_tokens
            if self.batch_invariant and torch.compiler.is_compiling():
                mix = torch.ops.tinylm.deltanet_mix  # the same body, opaque to Inductor (model/opaque_ops.py)
            out, conv_state, recurrent_state = mix(
                qkv, z, b, a, conv_state, recurrent_state, lengths, pad_mask, self.conv1d.weight, self.A_log,
                self.dt_bias, self.norm.weight, self.norm.eps, self.num_k_heads, self.head_k_dim,
                self.batch_invariant)
        if cache is not None:
            cache.set_linear_state(self.layer_idx, conv_state, recurrent_state)
        out = self.out_proj(out.reshape(batch, seq, self.value_dim))
        return out if order is None else _take(out, torch.argsort(order, dim=1))

    def _project(self, x: torch.Tensor):
        """x (B, T, C) -> qkv (B, T, conv_dim) as [q | k | v], z (B, T, H_v, D_v), b and a (B, T, H_v).

        The fused projections are laid out per key head: [q, k, v-group, z-group] and [b-group, a-group], where a
        group holds the H_v / H_k value heads that share the key head (fix_query_key_value_ordering).
        """
        batch, seq, _ = x.shape
        per_k = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(batch, seq, self.num_k_heads, -1)
        ba = self.in_proj_ba(x).view(batch, seq, self.num_k_heads, 2 * per_k)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, per_k * self.head_v_dim,
                                 per_k * self.head_v_dim], dim=3)
        b, a = ba.split([per_k, per_k], dim=3)
        qkv = torch.cat([t.reshape(batch, seq, -1) for t in (q, k, v)], dim=-1)
        z = z.reshape(batch, seq, self.num_v_heads, self.head_v_dim)
        return qkv, z, b.reshape(batch, seq, self.num_v_heads), a.reshape(batch, seq, self.num_v_heads)


def _real_tokens_first(pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pad_mask (B, T) -> (order (B, T): a stable permutation putting each row's real tokens first, the mask in
    that order). Padding anywhere (left, as the generation loop and engine pad) then sits after the real tokens,
    so the conv window and the delta state run over real tokens only, also when a row continues a cached state."""
    order = torch.argsort((pad_mask == 0).to(torch.int8), dim=1, stable=True)
    return order, pad_mask.gather(1, order).to(torch.float32)


def _take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) reordered along T by order (B, T)."""
    return x.gather(1, order[:, :, None].expand_as(x))


def mix_tokens(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
               conv_state: torch.Tensor | None, recurrent_state: torch.Tensor | None, lengths: torch.Tensor | None,
               pad_mask: torch.Tensor | None, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
               norm_weight: torch.Tensor, eps: float, num_k_heads: int, head_k_dim: int,
               invariant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated DeltaNet between its projections: conv + SiLU, the gated delta rule and the gated norm.

    qkv (B, T, conv_dim) as [q | k | v]; z (B, T, H_v, D_v); b, a (B, T, H_v); the states (B, conv_dim, K-1) and
    (B, H_v, D_k, D_v) or None; lengths (B,) and pad_mask (B, T) for padded rows (real tokens first) or None.
    Returns (out (B, T, H_v * D_v) in qkv's dtype, new conv state, new recurrent state float32). invariant: the
    recurrent form and the tap-by-tap conv for prompts too, as a decode step computes them.
    """
    batch, seq, _ = qkv.shape
    num_v_heads, head_v_dim = z.shape[2], z.shape[3]
    key_dim = num_k_heads * head_k_dim
    qkv, conv_state = causal_conv1d(qkv.transpose(1, 2), conv_weight, conv_state, lengths, tap_by_tap=invariant)
    q, k, v = qkv.transpose(1, 2).split([key_dim, key_dim, num_v_heads * head_v_dim], dim=-1)
    q = q.reshape(batch, seq, num_k_heads, head_k_dim)
    k = k.reshape(batch, seq, num_k_heads, head_k_dim)
    v = v.reshape(batch, seq, num_v_heads, head_v_dim)
    beta = b.sigmoid()  # (B, T, H_v)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)  # (B, T, H_v) log decay, float32
    if pad_mask is not None:  # padding neither decays nor writes the state
        beta, g = beta * pad_mask[:, :, None], g * pad_mask[:, :, None]
    # As the reference: the recurrent form only for a 1-token step that continues a state.
    recurrent = (recurrent_state is not None and seq == 1) or invariant
    rule = recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule
    out, recurrent_state = rule(q, k, v, g, beta, initial_state=recurrent_state)  # (B, T, H_v, D_v)
    out = gated_rms_norm(out.reshape(-1, head_v_dim), z.reshape(-1, head_v_dim), norm_weight, eps)
    return out.reshape(batch, seq, num_v_heads * head_v_dim), conv_state, recurrent_state


@torch.library.custom_op("tinylm::deltanet_mix", mutates_args=())
def _deltanet_mix_op(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                     conv_state: torch.Tensor | None, recurrent_state: torch.Tensor | None,
                     lengths: torch.Tensor | None, pad_mask: torch.Tensor | None, conv_weight: torch.Tensor,
                     A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     num_k_heads: int, head_k_dim: int,
                     invariant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mix_tokens(qkv, z, b, a, conv_state, recurrent_state, lengths, pad_mask, conv_weight, A_log, dt_bias,
                      norm_weight, eps, num_k_heads, head_k_dim, invariant)


@_deltanet_mix_op.register_fake
def _(qkv, z, b, a, conv_state, recurrent_state, lengths, pad_mask, conv_weight, A_log, dt_bias, norm_weight, eps,
      num_k_heads, head_k_dim, invariant):
    batch, seq, channels = qkv.shape
    num_v_heads, head_v_dim = z.shape[2], z.shape[3]
    out = qkv.new_empty(batch, seq, num_v_heads * head_v_dim)
    new_conv = qkv.new_empty(batch, channels, conv_weight.shape[-1] - 1)
    new_recurrent = qkv.new_empty(batch, num_v_heads, head_k_dim, head_v_dim, dtype=torch.float32)
    return out, new_conv, new_recurrent
