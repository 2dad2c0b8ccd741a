"""tinylm's int4 x int8 product (tinylm/kernels/int4_gemm.cpp) against integer arithmetic written out in torch:
the same bits on every instruction set the build has, whatever the number of rows or threads."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels
from tinylm.quant import int4pack

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's C++ kernels")
SCALAR, AVX2, AVX512_VNNI = 1, 2, 3  # the op's `isa` argument (0: the best one built)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> xq (M, K/32, 32) int64 in [-127, 127], dx (M, K/32): llama.cpp's Q8_0, as the kernel."""
    blocks = x.reshape(x.shape[0], -1, 32)
    dx = blocks.abs().amax(-1) / 127.0
    inverse = torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))
    return (blocks * inverse[..., None]).round().clamp(-127, 127).long(), dx


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic: exact integer dots per block of 32, then its float sequence (each op rounded on
    its own, in the same order). x (M, K), q (N, K) in [0, 15], scales / mins (N, G) float32 -> (M, N)."""
    xq, dx = quantize_blocks(x)  # (M, B, 32), (M, B)
    rows, blocks = q.shape[0], xq.shape[1]
    dots = (xq[:, None] * q.long().reshape(1, rows, blocks, 32)).sum(-1)  # (M, N, B) exact
    sums = xq.sum(-1).float()  # (M, B) exact integers
    per_group = blocks // scales.shape[1]
    acc = torch.zeros(x.shape[0], rows)
    for g in range(scales.shape[1]):
        xsum = torch.zeros(x.shape[0])
        for b in range(g * per_group, (g + 1) * per_group):
            acc = acc + (dots[..., b].float() * dx[:, b:b + 1]) * scales[:, g]
            xsum = xsum + dx[:, b] * sums[:, b]
        acc = acc + mins[:, g] * xsum[:, None]
    return acc


def isas() -> list[int]:
    return list(range(SCALAR, torch.ops.tinylm.int4_gemm_best_isa() + 1))


def weights(rows: int, cols: int, group: int, seed: int):
    """Random q and fp16-exact (scale, min) pairs: what the layer stores."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, cols // group, generator=g) * 0.1).half().float()
    mins = (torch.randn(rows, cols // group, generator=g) * 0.4).half().float()
    return q, scales, mins


@pytest.mark.parametrize("shape", [(1, 16, 32, 32), (3, 48, 256, 64), (16, 64, 512, 128), (7, 32, 576, 32),
                                   (5, 16, 256, 256), (13, 96, 1536, 32), (40, 32, 128, 32)])
def test_every_isa_matches_integer_arithmetic_exactly(shape):
    m, n, k, group = shape
    q, scales, mins = weights(n, k, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    x[0, :32] = 0  # an all-zero block: dx = 0, contributes nothing
    expected = reference(x, q, scales, mins)
    tiles, tiled = int4pack.to_tiles(q), int4pack.tile_scales(scales, mins)
    for isa in isas():
        out = torch.ops.tinylm.int4_gemm(x, tiles, tiled, isa)
        assert out.shape == (m, n) and out.dtype == torch.float32
        assert torch.equal(out, expected), f"isa {isa}"


def test_a_row_does_not_depend_on_the_batch_or_threads():
    """Batch invariance (issue 21): row i of a 16-row call == that row alone, on 1 or 2 threads."""
    q, scales, mins = weights(256, 576, 32, seed=5)
    tiles, tiled = int4pack.to_tiles(q), int4pack.tile_scales(scales, mins)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([torch.ops.tinylm.int4_gemm(x[i:i + 1], tiles, tiled) for i in range(16)])
        torch.set_num_threads(max(2, threads))
        together = torch.ops.tinylm.int4_gemm(x, tiles, tiled)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)
    assert torch.equal(torch.ops.tinylm.int4_gemm(x[3:9], tiles, tiled), alone[3:9])


@pytest.mark.parametrize("m", [2, 5, 8, 9, 12, 15, 16, 17, 24, 70])
def test_row_counts_across_the_passes_of_8_rows_are_exact(m):
    """The VNNI path takes rows 8 at a time (16 rows: two passes; 12: 4 then 8): every split gives each row the
    reference bits, on every instruction set."""
    q, scales, mins = weights(32, 576, 32, seed=m)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)) * 2
    x[m // 2, 100] = 3e-30  # a tiny value in an otherwise normal block
    expected = reference(x, q, scales, mins)
    tiles, tiled = int4pack.to_tiles(q), int4pack.tile_scales(scales, mins)
    for isa in isas():
        assert torch.equal(torch.ops.tinylm.int4_gemm(x, tiles, tiled, isa), expected), f"isa {isa}"


def test_nan_and_inf_inputs_give_the_same_bits_on_every_isa():
    """The AVX-512 activation quantizer (VNNI path) and the scalar one (other paths) agree on NaN and inf too."""
    q, scales, mins = weights(32, 128, 32, seed=3)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    x[0, 5], x[1, 7], x[2, 40] = float("nan"), float("inf"), -float("inf")
    tiles, tiled = int4pack.to_tiles(q), int4pack.tile_scales(scales, mins)
    outs = [torch.ops.tinylm.int4_gemm(x, tiles, tiled, isa).view(torch.int32) for isa in isas()]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


def test_it_stands_for_the_dequantized_product_of_quantized_activations():
    """The arithmetic is x's Q8_0 blocks times w = scale * q + min, to float rounding (what the gate sees)."""
    q, scales, mins = weights(64, 256, 64, seed=7)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(8))
    xq, dx = quantize_blocks(x)
    x_blocks = (xq.float() * dx[..., None]).reshape(4, 256)
    w = (q.float().reshape(64, 4, 64) * scales[..., None] + mins[..., None]).reshape(64, 256)
    out = torch.ops.tinylm.int4_gemm(x, int4pack.to_tiles(q), int4pack.tile_scales(scales, mins))
    torch.testing.assert_close(out, x_blocks @ w.T, rtol=1e-5, atol=1e-4)


def test_tile_layout_round_trips():
    q, scales, mins = weights(48, 96, 32, seed=9)
    tiles = int4pack.to_tiles(q)
    assert tiles.shape == (48, 48) and torch.equal(int4pack.from_tiles(tiles), q)
    ids = torch.tensor([[0, 47, 17], [16, 16, 31]])
    assert torch.equal(int4pack.gather_tile_rows(tiles, ids), q[ids])
    back_scales, back_mins = int4pack.untile_scales(int4pack.tile_scales(scales, mins))
    assert torch.equal(back_scales, scales) and torch.equal(back_mins, mins)


def test_shapes_it_cannot_tile_are_refused():
    q, scales, mins = weights(16, 64, 32, seed=10)
    tiled = int4pack.tile_scales(scales, mins)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tinylm.int4_gemm(torch.zeros(1, 48), int4pack.to_tiles(q)[:, :24].contiguous(), tiled)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.tinylm.int4_gemm(torch.zeros(1, 64, dtype=torch.bfloat16), int4pack.to_tiles(q), tiled)
