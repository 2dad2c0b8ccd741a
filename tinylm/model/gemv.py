"""Matrix-vector products written for Inductor: the batch-1 decode step's projections at memory speed.

At batch 1 every projection is a GEMV that reads its whole weight once; its speed is the rate it streams the
weight from memory. PyTorch's CPU GEMV (oneDNN / MKL) streams small matrices badly: about 20 GB/s over the
default model's layers on a 2-core AVX512-BF16 EPYC, where a plain reduction `(x * W).sum(-1)` that Inductor
compiles into one vectorized C++ loop reads as fast as a bare `sum` (37-51 GB/s from day to day there;
benchmarks/gemv_bandwidth.py, BENCHMARKS.md issue 5). So inside a compiled graph, and only for a single row,
`GemvLinear` writes the product as that reduction (products in float32, as the library kernels accumulate).
The reduction does not scale to more rows (it recomputes the bf16 -> float32 widening per row). Where tinylm's
AVX-512 BF16 kernel is built (tinylm/kernels/bf16_gemm.cpp), compiled bf16 steps of 1-16 rows (decode, decode
batches, speculative verification) call it instead: it reads each weight once whatever the row count (at::mm
reads them at 15-20 GB/s at 2-16 rows), and at one row it beat the reduction in 5 of 6 alternating pairs of
runs (batch-1 step 6.2-7.9 against 7.3-8.4 ms: it prefetches the next rows). Everywhere else (eager, prefill,
training) it is `F.linear`.

Eagerly the reduction would materialize an (N, K) float32 temporary: it is never taken outside torch.compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GemvLinear(nn.Linear):
    """nn.Linear whose products inside torch.compile go to tinylm's AVX-512 BF16 kernel for bf16 weights of up to
    16 rows (`few_rows_kernel`, set by use_gemv), else are a streaming reduction for one row."""

    few_rows_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if self.few_rows_kernel:  # up to 16 rows in the kernel, more through at::mm (tinylm/kernels/bf16_gemm.cpp)
            y = torch.ops.tinylm.bf16_gemm(x.reshape(-1, x.shape[-1]), self.weight)  # (rows, N) float32
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype).reshape(*x.shape[:-1], self.weight.shape[0])
        if x.numel() == x.shape[-1]:  # one row: static in the batch-1 graph
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K) -> (..., N) in x's dtype; float32 products and sums."""
    y = (x.reshape(1, -1).float() * weight.float()).sum(dim=-1)  # (N,): Inductor fuses cast, product and sum
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def use_gemv(model: nn.Module) -> int:
    """Make every plain float nn.Linear of `model` a GemvLinear in place (same parameters, tied ones stay tied);
    returns how many. Inference only, like fused projections: the engine applies it when it compiles decode."""
    from tinylm import kernels

    few_rows = kernels.bf16_gemm_available()
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
            module.few_rows_kernel = few_rows and module.weight.dtype == torch.bfloat16 and module.weight.is_cpu
            count += 1
    return count
