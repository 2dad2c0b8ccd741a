"""The C++ paged decode attention (tinylm/kernels/decode_attention.cpp) against SDPA over the gathered cache."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain to build tinylm's kernels")


def _reference(q, k_pool, v_pool, slots, valid):
    """q (B, H, D), pools (N, H_kv, D), slots/valid (B, S) -> SDPA on the gathered float32 K/V, (B, H, D)."""
    k = k_pool[slots].float().transpose(1, 2)  # (B, H_kv, S, D)
    v = v_pool[slots].float().transpose(1, 2)
    mask = None if valid is None else valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 150), (5, 4, 2, 16, 33), (2, 4, 1, 48, 130), (3, 8, 8, 128, 1),
                                   (2, 16, 1, 256, 65), (2, 14, 2, 64, 70), (1, 4, 1, 32, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa_on_the_gathered_cache(dtype, shape, masked):
    batch, heads, kv_heads, dim, context = shape
    torch.manual_seed(0)
    k_pool, v_pool = (torch.randn(512, kv_heads, dim).to(dtype) for _ in range(2))
    slots = torch.randint(0, 512, (batch, context))
    valid = None
    if masked:  # left padding of different lengths; the newest key is always real
        valid = torch.arange(context)[None] >= torch.randint(0, context, (batch, 1))
        valid[:, -1] = True
    q = torch.randn(batch, heads, dim)
    out = torch.ops.tinylm.paged_attention(q, k_pool, v_pool, slots, valid, dim ** -0.5)
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, slots, valid), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 9, 3, 64, 150), (5, 4, 2, 16, 33), (2, 14, 2, 64, 70), (2, 16, 1, 256, 65)])
@pytest.mark.parametrize("masked", [False, True])
def test_int8_pool_matches_sdpa_on_the_dequantized_cache(shape, masked):
    """An int8 pool's rows are codes x a per-row scale (kv_pool.quantize_rows): the kernel applies the scales
    itself and must give attention over the dequantized rows."""
    from tinylm.engine.kv_pool import quantize_rows

    batch, heads, kv_heads, dim, context = shape
    torch.manual_seed(1)
    (k_codes, k_scales), (v_codes, v_scales) = (quantize_rows(torch.randn(512, kv_heads, dim) * 3) for _ in range(2))
    slots = torch.randint(0, 512, (batch, context))
    valid = None
    if masked:
        valid = torch.arange(context)[None] >= torch.randint(0, context, (batch, 1))
        valid[:, -1] = True
    q = torch.randn(batch, heads, dim)
    out = torch.ops.tinylm.paged_attention(q, k_codes, v_codes, slots, valid, dim ** -0.5, k_scales, v_scales)
    k_pool, v_pool = k_codes.float() * k_scales[..., None], v_codes.float() * v_scales[..., None]
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, slots, valid), rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="row scales"):
        torch.ops.tinylm.paged_attention(q, k_codes, v_codes, slots, valid, dim ** -0.5)


def test_masked_keys_are_never_read():
    """Padding keys point at slot 0, whose contents must not matter, not even NaN."""
    k_pool, v_pool = torch.randn(64, 2, 32), torch.randn(64, 2, 32)
    k_pool[0], v_pool[0] = float("nan"), float("nan")
    slots = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    valid = slots != 0
    out = torch.ops.tinylm.paged_attention(torch.randn(2, 4, 32), k_pool, v_pool, slots, valid, 0.2)
    assert torch.isfinite(out).all()


def test_bad_inputs_raise_instead_of_reading_out_of_bounds():
    k_pool = torch.randn(64, 2, 24)
    with pytest.raises(RuntimeError, match="head size"):
        torch.ops.tinylm.paged_attention(torch.randn(1, 4, 24), k_pool, k_pool, torch.zeros(1, 3, dtype=torch.long),
                                         None, 1.0)
    pool = torch.randn(64, 2, 32)
    with pytest.raises(RuntimeError, match="slots"):
        torch.ops.tinylm.paged_attention(torch.randn(1, 4, 32), pool, pool, torch.zeros(3, dtype=torch.long),
                                         None, 1.0)
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.tinylm.paged_attention(torch.randn(1, 4, 32), pool, pool, torch.tensor([[3, 64]]), None, 1.0)
