"""Batch-1 products written as reductions for Inductor (tinylm/model/gemv.py, Int8Linear's compiled path) give
the library kernels' results, and swapping the layer class keeps parameters and ties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinylm.model.gemv import GemvLinear, use_gemv
from tinylm.quant.linear import Int8Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_gemv_matches_linear(dtype, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=bias).to(dtype)
    use_gemv(nn.Sequential(layer))
    assert type(layer) is GemvLinear
    layer.few_rows_kernel = False  # the reduction itself (bf16 weights take tinylm's kernel where it is built)
    x = torch.randn(1, 1, 96, dtype=dtype)
    eager, compiled = layer(x), torch.compile(layer)(x)  # eagerly: F.linear; compiled: the reduction
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    assert compiled.dtype == dtype and compiled.shape == (1, 1, 200)


def test_compiled_int8_row_matches_kernel():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(200, 96), torch.randn(200), dtype=torch.float32)
    x = torch.randn(1, 96)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-2, atol=1e-2)  # kernel: bf16 input


def test_use_gemv_keeps_tied_head(load_tiny):
    llm = load_tiny("qwen3", seed=0, batch_invariant=False)  # the library products use_gemv swaps
    assert llm.config.tie_word_embeddings
    ids = torch.tensor([llm.encode("Once upon a time")])
    before = llm.forward(ids).logits
    assert use_gemv(llm.model) > 0
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    torch.testing.assert_close(llm.forward(ids).logits, before)  # eager: unchanged
