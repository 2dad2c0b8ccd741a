"""The gated delta rule (Gated DeltaNet, arXiv:2412.06464) and its causal depthwise conv, in plain PyTorch.

Two forms of the same recurrence, per value head h, with S the (D_k, D_v) state, q and k L2-normalized:
    S_t = exp(g_t) * S_{t-1};  S_t += k_t (beta_t * (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t / sqrt(D_k)
- `chunk_gated_delta_rule`: the parallel (chunked, UT-transform) form for prompts; no Python loop over tokens.
- `recurrent_gated_delta_rule`: token by token, for 1-token decode steps (and prompts, batch invariant); on CPU
  without gradients the loop is tinylm's C++ kernel (tinylm/kernels/delta_rule.cpp).
Both accept an initial state, so a prompt fed in pieces equals one pass. They follow transformers'
torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule operation by operation (fp32 parity):
https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/modeling_qwen3_next.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.kernels.invariant import kernels_take

CHUNK_SIZE = 64  # the reference's (and FLA's) chunk length


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as FLA and the reference compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None,
                  lengths: torch.Tensor | None = None, tap_by_tap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU over time, continuing from `state`.

    x (B, C, T); weight (C, 1, K); state (B, C, K-1), the last K-1 inputs before x (zeros when None);
    lengths (B,) or None: real inputs per row when x is right-padded, so the new state ends at the last real one.
    Returns (silu(conv) (B, C, T) in x's dtype, new state (B, C, K-1): the last K-1 inputs of [state, x]).
    tap_by_tap: the sum over the K taps as K element-wise float32 multiply-adds in tap order, for prompts and
    decode steps alike (batch-invariant inference: F.conv1d and the one-step dot product sum in other orders).
    """
    kernel = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], kernel - 1)
    full = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    if tap_by_tap:
        out = _conv_taps(full, weight, x.shape[-1])
    elif x.shape[-1] == 1:
        # A decode step is one dot product per channel; depthwise F.conv1d costs ~5x more on CPU for this shape.
        out = (full.to(weight.dtype) * weight[:, 0]).sum(dim=-1, keepdim=True)  # (B, C, 1)
    else:
        out = F.conv1d(full.to(weight.dtype), weight, groups=x.shape[1])  # (B, C, T): no padding, state is the past
    if lengths is None:
        new_state = full[:, :, full.shape[-1] - (kernel - 1):].contiguous()
    else:  # row b's state is full[b, :, lengths[b] : lengths[b] + K-1]
        index = (lengths[:, None] + torch.arange(kernel - 1, device=x.device))[:, None, :]  # (B, 1, K-1)
        new_state = full.gather(2, index.expand(-1, full.shape[1], -1))
    return F.silu(out).to(x.dtype), new_state


def _conv_taps(full: torch.Tensor, weight: torch.Tensor, steps: int) -> torch.Tensor:
    """full (B, C, K-1+T), weight (C, 1, K) -> (B, C, T) in weight's dtype: output t is sum_j full[t + j] * w[j],
    added in tap order in float32, each element by the same operations whatever T."""
    taps = weight[:, 0].float()  # (C, K)
    out = full[:, :, 0:steps].float() * taps[:, 0:1]
    for j in range(1, taps.shape[-1]):
        out = out + full[:, :, j:j + steps].float() * taps[:, j:j + 1]
    return out.to(weight.dtype)


def _heads_first(q, k, v, g, beta):
    """(B, T, H, D) / (B, T, H) inputs -> float32 (B, H_v, T, D) / (B, H_v, T), q and k L2-normalized and repeated
    so each query/key head serves H_v / H_k consecutive value heads."""
    repeat = v.shape[2] // k.shape[2]
    if repeat != 1:
        q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
    q, k, v, beta, g = (t.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for t in (q, k, v, beta, g))
    return l2norm(q), l2norm(k), v, g, beta


def _initial_state(state: torch.Tensor | None, v: torch.Tensor, k_dim: int) -> torch.Tensor:
    if state is None:
        return v.new_zeros(v.shape[0], v.shape[1], k_dim, v.shape[-1])  # (B, H_v, D_k, D_v)
    return state.to(v)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor | None = None,
                           chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, H_k, D_k); v (B, T, H_v, D_v); g (log decay, <= 0) and beta (B, T, H_v);
    initial_state (B, H_v, D_k, D_v) or None. Returns (out (B, T, H_v, D_v) in q's dtype, final state float32)."""
    dtype, seq = q.dtype, q.shape[1]
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    q = q * q.shape[-1] ** -0.5
    pad = (chunk_size - seq % chunk_size) % chunk_size
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)

    def chunks(t):  # (B, H, T, D) -> (B, H, N, C, D)
        return t.reshape(t.shape[0], t.shape[1], -1, chunk_size, t.shape[-1])

    q, k, k_beta, v_beta = chunks(q), chunks(k), chunks(k_beta), chunks(v_beta)
    cum = g.reshape(g.shape[0], g.shape[1], -1, chunk_size).cumsum(dim=-1)  # (B, H, N, C) log decay since chunk start
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    pair = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # (B, H, N, C, C)
    ut_system = (k_beta @ k.transpose(-1, -2)) * pair
    intra = (q @ k.transpose(-1, -2)) * pair
    # UT transform: (I + strictly-lower(ut_system))^-1 applied to beta*v and to the decayed beta*k.
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(ut_system, k_beta * cum.exp().unsqueeze(-1), upper=False,
                                               unitriangular=True)
    state = _initial_state(initial_state, new_values, k.shape[-1])
    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)
    out = torch.zeros_like(new_values)
    for i in range(new_values.shape[2]):  # a loop over chunks, not tokens
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(out.shape[0], out.shape[1], -1, out.shape[-1])[:, :, :seq]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), state


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor,
                               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as `chunk_gated_delta_rule`, one token at a time (decode steps)."""
    dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    q = q / (q.shape[-1] ** 0.5)
    state = _initial_state(initial_state, v, k.shape[-1])  # (B, H, D_k, D_v)
    if kernels_take(q, k, v, g, beta, state):  # the same recurrence in C++ (no backward: training loops here)
        out, state = torch.ops.tinylm.gated_delta_rule(q, k, v, g, beta, state)
        return out.transpose(1, 2).contiguous().to(dtype), state
    out = torch.zeros_like(v)
    for t in range(v.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        memory = (state * k[:, :, t].unsqueeze(-1)).sum(dim=-2)  # (B, H, D_v): what the state predicts for k_t
        delta = (v[:, :, t] - memory) * beta[:, :, t].unsqueeze(-1)
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, t] = (state * q[:, :, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(1, 2).contiguous().to(dtype), state
