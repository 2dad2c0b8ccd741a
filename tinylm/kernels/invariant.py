"""Batch-invariant linear layers: `invariant_linear(x, weight, bias)` is F.linear whose every output row is
bitwise the same whatever else is in the batch (issue 21). A bfloat16 weight also takes float32 x: the kernel widens
it exactly (the float32 product of the rounded weight, at half the weight bytes).

PyTorch's CPU products pick their algorithm by the number of rows (oneDNN / MKL block K differently for 1, 2,
16+ rows; bf16 switches to AMX tiles from 64 rows), so a token's logits change with the batch it is in. The C++
kernel (tinylm/kernels/invariant_gemm.cpp) computes each output element by one fixed sequence of float32
operations over K, whatever M, the other rows, the thread count or the split of the work. Output in x's dtype,
as F.linear: float32 sums, bias added in float32, one rounding to bfloat16 at the end.

Where the kernels cannot be built, or for dtypes / devices the kernel does not take (float16, CUDA), it is
F.linear, with one warning: the result is then correct but not batch invariant.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tinylm import kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_WARNED: set[str] = set()


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     float_out: bool = False) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's dtype (float32 with float_out), each row
    independent of the others."""
    reason = _fallback_reason(x, weight)
    if reason is not None:
        _warn_once(reason)
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # (M, K): a view when the leading dims merge; the op copies strided rows
    out = torch.ops.tinylm.invariant_linear(rows, weight, bias, float_out)  # (M, N)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """RMSNorm of x (..., C) with weight (C,) (tinylm/model/layers.py's formula), each row's bits fixed
    (tinylm/kernels/invariant_rows.cpp). Callers check `kernel_takes(x)` first."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.tinylm.invariant_rms_norm(rows, weight, eps, zero_centered).view(x.shape)


def invariant_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., I) (SwiGLU's product), each row's bits fixed. Callers check
    `kernel_takes(gate)` first."""
    out = torch.ops.tinylm.invariant_silu_mul(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
    return out.view(gate.shape)


def attend_key_ranges(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, ends: torch.Tensor, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """tinylm::invariant_attention for T queries per row: q (B, H, T, D); keys / values a pool (slots, H_kv, D)
    (int8 codes with their row scales, or floats); slots (B, S) each row's context; starts, ends (B, T) the key
    range [start, end) of each query -> (B, H, T, D) in q's dtype."""
    batch, heads, steps, dim = q.shape
    rows = torch.arange(batch, device=q.device).repeat_interleave(steps)
    q_rows = q.transpose(1, 2).reshape(batch * steps, heads, dim).float().contiguous()  # (B*T, H, D)
    out = torch.ops.tinylm.invariant_attention(q_rows, keys, values, slots, rows, starts.reshape(-1).contiguous(),
                                               ends.reshape(-1).contiguous(), dim ** -0.5, k_scales, v_scales)
    return out.to(q.dtype).view(batch, steps, heads, dim).transpose(1, 2)


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether the invariant row kernels take x (CPU, float32 / bfloat16, unit last stride) without autograd: a
    training forward keeps PyTorch's differentiable formulation."""
    return (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and x.stride(-1) == 1
            and not (torch.is_grad_enabled() and x.requires_grad))


def kernels_take(*tensors: torch.Tensor) -> bool:
    """Whether tinylm's C++ kernels run these tensors: each one as `kernel_takes` says (no autograd: the kernels
    have no backward), and the kernels are built here. The condition of every op that replaces a PyTorch form
    (DeltaNet's recurrence and mixing, the MoE experts, the sigmoid gate)."""
    return all(kernel_takes(t) for t in tensors) and kernels.available()


def register_autograd() -> None:
    """Gradients of tinylm::invariant_linear (called once the kernels are registered): the usual linear backward
    through PyTorch's products, so training can run the same forward the engine samples with. Only the forward
    is batch invariant."""
    torch.library.register_autograd("tinylm::invariant_linear", _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors  # (M, K), (N, K); grad (M, N)
    grad_bias = grad.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    grad = grad.to(x.dtype)  # float_out's float32 gradient, back in the inputs' dtype
    grad_x = grad @ weight.to(x.dtype) if ctx.needs_input_grad[0] else None  # (a bfloat16 weight of float32 x)
    grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, grad_bias, None


def _fallback_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this product (None when it can)."""
    if not kernels.available():
        return "tinylm's CPU kernels are not built here"
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"the batch-invariant product runs on CPU only (got {x.device.type})"
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in (x.dtype, torch.bfloat16):
        return f"the batch-invariant product takes float32 or bfloat16 (got {x.dtype} x {weight.dtype})"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"{reason}: using F.linear, whose rows depend on the batch", RuntimeWarning, stacklevel=3)
