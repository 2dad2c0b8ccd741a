"""tinylm's int8 product (tinylm/kernels/int8_gemm.cpp: AVX-512 VNNI, or AVX2) against exact integer arithmetic."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels

pytestmark = pytest.mark.skipif(not kernels.int8_gemm_available(), reason="needs the kernels and AVX-512 VNNI or AVX2")


# a tile, part of one, more (VNNI: oneDNN); 100 rows of K = 576: two of the AVX2 path's row chunks (81 rows)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 100])
# K = 4 and 36: the AVX2 path's steps of 16 k with a tail of 4 (none, and after 32)
@pytest.mark.parametrize("shape", [(16, 4), (32, 36), (48, 64), (960, 576)])
def test_exact_sums_times_scales(rows, shape):
    cols, depth = shape
    torch.manual_seed(rows)
    weight = torch.randint(-128, 128, (cols, depth), dtype=torch.int8)
    x_u8 = torch.randint(0, 256, (rows, depth), dtype=torch.uint8)
    scales = torch.rand(cols)
    out = torch.ops.tinylm.int8_gemm(x_u8, weight, weight.sum(dim=1, dtype=torch.int32), scales)
    exact = ((x_u8.int() - 128) @ weight.int().t()).float() * scales
    assert out.shape == (rows, cols) and out.is_contiguous()
    assert torch.equal(out, exact)


def test_shapes_it_cannot_tile_are_refused():
    weight = torch.zeros(40, 64, dtype=torch.int8)  # 40 rows: not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.tinylm.int8_gemm(torch.zeros(2, 64, dtype=torch.uint8), weight, torch.zeros(40, dtype=torch.int32),
                                   torch.ones(40))
    with pytest.raises(RuntimeError, match="x_u8"):
        torch.ops.tinylm.int8_gemm(torch.zeros(2, 64), weight[:32], torch.zeros(32, dtype=torch.int32), torch.ones(32))
