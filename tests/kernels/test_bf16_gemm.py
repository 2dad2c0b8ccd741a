"""tinylm's bf16 product for a few rows (tinylm/kernels/bf16_gemm.cpp) against float32 arithmetic on the same
bf16 values, and inside a compiled GemvLinear."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from tinylm import kernels
from tinylm.model.gemv import GemvLinear, use_gemv

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16, 17, 40])  # tiles of 4 and partial ones; at::mm above 16
@pytest.mark.parametrize("shape", [(4, 32), (960, 576), (12, 100), (10, 64)])  # K % 32 tail; N % 4: at::mm
def test_matches_float32_products(rows, shape):
    cols, depth = shape
    torch.manual_seed(rows)
    x = torch.randn(rows, depth).bfloat16()
    weight = torch.randn(cols, depth).bfloat16()
    out = torch.ops.tinylm.bf16_gemm(x, weight)
    exact = x.double() @ weight.double().t()
    assert out.shape == (rows, cols) and out.dtype == torch.float32
    # float32 sums of exact products (bf16 x bf16 fits float32); at::mm (above 16 rows) rounds to bf16 first
    # (without AVX-512 BF16 the op is at::mm at every row count)
    tol = 1e-5 if rows <= 16 and cols % 4 == 0 and kernels.bf16_gemm_available() else 1e-2
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * depth ** 0.5)


def test_strided_input_and_bad_dtypes():
    x = torch.randn(6, 64).bfloat16()[::2]  # (3, 64), not contiguous
    weight = torch.randn(8, 64).bfloat16()
    tol = 1e-5 if kernels.bf16_gemm_available() else 1e-2  # at::mm's bf16 output without AVX-512 BF16
    torch.testing.assert_close(torch.ops.tinylm.bf16_gemm(x, weight), x.float() @ weight.float().t(),
                               rtol=tol, atol=tol * 10)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.tinylm.bf16_gemm(x.float(), weight)


@pytest.mark.skipif(not kernels.bf16_gemm_available(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 24])
def test_compiled_linear_of_few_rows_uses_the_kernel(rows):
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=True).bfloat16()
    use_gemv(nn.Sequential(layer))
    assert type(layer) is GemvLinear and layer.few_rows_kernel
    x = torch.randn(rows, 1, 96).bfloat16()
    with torch.no_grad():  # inference, as in the decode step
        compiled, code = run_and_get_code(torch.compile(layer, dynamic=False), x)
    assert "bf16_gemm" in "".join(code)
    assert compiled.dtype == torch.bfloat16 and compiled.shape == (rows, 1, 200)
    torch.testing.assert_close(compiled, layer(x), rtol=2e-2, atol=2e-2)
