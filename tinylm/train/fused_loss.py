"""Linear + cross-entropy without the (tokens x vocab) float logits: the output head and the loss in token chunks.

The plain loss keeps logits (N, V) in the compute dtype, their float32 copy, and the float32 softmax gradient alive
between forward and backward: at TinyLlama's 32,000-token vocabulary and 2048 x 8 tokens that is about 6 GB. Here
the forward walks the N label-carrying tokens in chunks of `chunk` rows; per chunk it makes the logits (chunk, V),
their log-sum-exp, the loss sum, and at once the gradient d loss / d logits = softmax - onehot, which it folds into
the gradients of the hidden states (chunk, C), of the weight (V, C) and of the bias (V,). Only those are kept, so
the backward is a multiplication by the incoming scalar: three products per chunk, as the plain path (no recompute).
This is Liger-Kernel's FusedLinearCrossEntropy written with torch ops (no Triton on CPU).

Under autocast the products run in the autocast dtype (as nn.Linear would) and the softmax in float32; gradients
accumulate in float32 and are returned in each input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
DEFAULT_CHUNK = 1024  # rows per chunk: (1024, 49152) float32 logits = 200 MB, 4 MB at 1024 x 1024


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk: int = DEFAULT_CHUNK, compiled: bool = False) -> torch.Tensor:
    """sum over tokens with labels[i] != -100 of CE(hidden[i] @ weight.T + bias, labels[i]) -> float32 scalar.

    hidden (N, C), weight (V, C), bias (V,) or None, labels (N,) int. Equal to
    F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=-100, reduction="sum"),
    values and gradients, to float32 rounding. compiled: the softmax and its gradient as one compiled kernel.
    """
    keep = (labels != IGNORE).nonzero().squeeze(-1)  # (n,): ignored rows cost nothing
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _loss_only(hidden.index_select(0, keep), weight, bias, labels.index_select(0, keep), chunk)
    grad_fn = compiled_softmax_grad if compiled else softmax_grad
    return _FusedLinearCE.apply(hidden, weight, bias, labels, keep, chunk, grad_fn)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B * T,): position t is scored on labels[t + 1] (Hugging Face's shift), the last on nothing.

    Shifting the labels instead of slicing the hidden states (B, T - 1, C) saves a copy of the activations."""
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.reshape(-1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, C) -> (n, V) float32, the product in the compute dtype (the autocast dtype under autocast)."""
    return F.linear(h, weight, bias).float()


def _loss_only(h, weight, bias, labels, chunk: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk):
        logits = _logits(h[start:start + chunk], weight, bias)
        total = total + F.cross_entropy(logits, labels[start:start + chunk], reduction="sum")
    return total


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, keep, chunk, grad_fn):
        dtype = _compute_dtype(weight)
        device = weight.device.type
        with torch.autocast(device, enabled=False):  # casts made explicit below: one per operand, not per chunk
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h_all = hidden.index_select(0, keep).to(dtype)  # (n, C)
            y_all = labels.index_select(0, keep)  # (n,)
            grad_h = torch.zeros_like(h_all, dtype=torch.float32)  # (n, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None \
                else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h_all.shape[0], chunk):
                h, y = h_all[start:start + chunk], y_all[start:start + chunk]
                total += _chunk_step(h, y, w, b, grad_h[start:start + chunk], grad_w, grad_b, grad_fn)
        ctx.save_for_backward(keep, grad_h, grad_w, grad_b)
        ctx.shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        keep, grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        d_hidden = torch.zeros(ctx.shape, dtype=h_dtype, device=grad_h.device)
        d_hidden.index_copy_(0, keep, (grad_h * grad_out).to(h_dtype))
        d_weight = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        d_bias = (grad_b * grad_out).to(b_dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
        return d_hidden, d_weight, d_bias, None, None, None, None


def softmax_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V) in the compute dtype, y (n,) -> (loss sum float32, d loss / d logits (n, V) in the logits'
    dtype). Softmax in float32, as the plain loss computes it.

    Eager: in place over one float32 copy of the logits, so one (n, V) float32 buffer is alive at a time."""
    z = logits.float()  # (n, V); the logits themselves when they are float32 (a temporary: free to overwrite)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    loss = (lse.squeeze(1) - z.gather(1, y[:, None]).squeeze(1)).sum()
    grad = z.sub_(lse).exp_()  # softmax
    grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
    return loss, grad.to(logits.dtype)


def _softmax_grad_for_compile(logits, y):
    """softmax_grad written without in-place ops or scatter, for Inductor to fuse into one kernel. No column sum
    for the bias here: as a reduction over rows inside the kernel it cost about as much as the softmax (measured
    100 of 290 ms at 1022 x 49152); the bias gradient is a product instead (_chunk_step)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    loss = (lse.squeeze(1) - z.gather(1, y[:, None]).squeeze(1)).sum()
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]  # (n, V), computed inside the kernel
    grad = torch.exp(z - lse) - onehot.float()
    return loss, grad.to(logits.dtype)


_COMPILED = {}


def compiled_softmax_grad(logits, y):
    """softmax_grad through torch.compile (dynamic in n: the last chunk is shorter); eager if compiling fails."""
    if "fn" not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        _COMPILED["fn"] = torch.compile(_softmax_grad_for_compile, dynamic=True)
    return _COMPILED["fn"](logits, y)


def _chunk_step(h, y, w, b, grad_h_out, grad_w, grad_b, grad_fn) -> torch.Tensor:
    """One chunk: h (n, C) in the compute dtype, y (n,). Writes d/dh into grad_h_out (n, C), adds into grad_w
    (V, C) and grad_b (V,); -> the chunk's loss sum (float32)."""
    loss, g = grad_fn(F.linear(h, w, b), y)  # g (n, V) in the compute dtype
    grad_h_out.copy_(g @ w)  # (n, C)
    if grad_b is not None:
        # The bias gradient (column sums of g) as one more column of the weight's product: g is read once by one
        # GEMM (+16 of C columns) instead of again by a matrix-vector product (18 ms of a 1.07 s QED-75M step).
        cols = h.shape[1]
        prod = g.t() @ _with_ones_column(h)  # (V, C + 16)
        grad_w += prod[:, :cols]
        grad_b += prod[:, cols]
    elif g.dtype == torch.float32:
        grad_w.addmm_(g.t(), h)  # (V, C), accumulated in place
    else:
        grad_w += g.t() @ h  # the bf16 product, accumulated over chunks in float32
    return loss


def _with_ones_column(h: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (n, C + 16): h, a column of ones, 15 of zeros (the width kept a multiple of 16 for the GEMM)."""
    extra = torch.zeros(h.shape[0], 16, dtype=h.dtype, device=h.device)
    extra[:, 0] = 1
    return torch.cat([h, extra], dim=1)
