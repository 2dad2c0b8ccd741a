"""tinylm::invariant_blocks_linear (tinylm/kernels/invariant_blocks.cpp): float32 products on GGUF blocks (Q4_0 /
Q4_1 / Q8_0 as stored, Q4_K / Q5_0 / Q5_1 / Q5_K / Q6_K in the forms tinylm/weights/gguf_blocks.py gives them) are
bitwise tinylm::invariant_linear on the weight gguf-py dequantizes, for every row count (in registers up to 16 rows,
over a widened copy from 17), every thread count, with and without bias, and refuse malformed parts with one clear
error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize, quantize

from tests.weights.conftest import encode_tensor
from tinylm import kernels
from tinylm.weights.gguf_blocks import blocks

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")

ROWS = [1, 2, 3, 4, 5, 16, 17, 40, 130]
KINDS = [QType.Q4_1, QType.Q4_0, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K]
SHAPES = [(1536, 576), (576, 1536), (7, 64), (37, 96)]  # the default model's, then tails of 4- and 8-row tiles
K_SHAPES = [(1536, 512), (512, 1536), (7, 256), (37, 768)]  # K-quants: 256 columns a block
K_QUANTS = (QType.Q4_K, QType.Q5_K, QType.Q6_K)  # gguf-py reads them but does not write them


def quantized(qtype, n, k, seed=0):
    """A random (N, K) weight through gguf-py (K-quants: random blocks with small f16 scales, which gguf-py reads but
    does not write): (the blocks as a file stores them, the float32 weight they stand for)."""
    values = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).numpy()
    if qtype in K_QUANTS:
        raw, _ = encode_tensor(values, qtype, np.random.default_rng(seed))
    else:
        raw = quantize(values, qtype)  # (N, row bytes) uint8
    weight = torch.from_numpy(dequantize(raw, qtype).astype(np.float32)).reshape(n, k)
    return blocks(qtype, raw, (n, k)), weight


def product(parts, x, bias=None):
    return torch.ops.tinylm.invariant_blocks_linear(x, parts.codes, parts.scales, parts.mins, parts.bits, bias)


@pytest.mark.parametrize("qtype", KINDS, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", range(4), ids=lambda i: str(SHAPES[i]))
def test_blocks_give_the_float32_product_of_the_dequantized_weight_bitwise(qtype, shape):
    shape = (K_SHAPES if qtype in K_QUANTS else SHAPES)[shape]
    parts, weight = quantized(qtype, *shape)
    assert torch.equal(parts.dequantize(), weight)  # tinylm's own widening (lookups, fallback)
    bias = torch.randn(shape[0])
    for rows in ROWS:
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        assert torch.equal(product(parts, x, bias), torch.ops.tinylm.invariant_linear(x, weight, bias)), rows
        assert torch.equal(product(parts, x), torch.ops.tinylm.invariant_linear(x, weight)), rows


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_bits_in_every_batch_and_thread_count(threads):
    parts, _ = quantized(QType.Q4_1, 960, 576, seed=1)
    probe = torch.randn(1, 576)
    alone = product(parts, probe)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in ROWS:
            x = torch.randn(rows, 576)
            x[rows // 2] = probe
            assert torch.equal(product(parts, x)[rows // 2], alone[0]), rows
    finally:
        torch.set_num_threads(previous)


def test_malformed_parts_are_refused_with_one_clear_error():
    parts, _ = quantized(QType.Q4_1, 8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="bits 4 or 8"):
        torch.ops.tinylm.invariant_blocks_linear(x, parts.codes, parts.scales, parts.mins, 5)
    with pytest.raises(RuntimeError, match="required for 4-bit codes"):
        torch.ops.tinylm.invariant_blocks_linear(x, parts.codes, parts.scales, None, 4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tinylm.invariant_blocks_linear(torch.randn(2, 48), parts.codes, parts.scales, parts.mins, 4)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.tinylm.invariant_blocks_linear(x.bfloat16(), parts.codes, parts.scales, parts.mins, 4)
