"""tinylm's weight-only int8 product (tinylm/kernels/int8_rows.cpp): the scalar and vector paths give the same
bits, a row's result does not depend on the other rows of the call, and the values are the float product."""

from __future__ import annotations

import pytest
import torch

from tinylm import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's C++ kernels")
SCALAR = 1  # the op's `isa` argument (0: the best one built)


def problem(m: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return x, q, torch.rand(n, generator=g) / 50


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 67, 576), (16, 130, 96), (37, 64, 1536), (5, 1, 32)])
def test_vector_path_equals_scalar_and_the_float_product(shape):
    m, n, k = shape
    x, q, scales = problem(m, n, k, seed=m + n)
    best = torch.ops.tinylm.int8_rows(x, q, scales)
    assert torch.equal(best, torch.ops.tinylm.int8_rows(x, q, scales, SCALAR))
    expected = (x.double() @ q.double().t()) * scales.double()
    torch.testing.assert_close(best.double(), expected, rtol=1e-5, atol=1e-4)


def test_a_row_is_the_same_bits_in_any_batch():
    x, q, scales = problem(40, 200, 576, seed=7)
    together = torch.ops.tinylm.int8_rows(x, q, scales)
    for rows in (slice(0, 1), slice(3, 5), slice(10, 27), slice(39, 40)):
        assert torch.equal(torch.ops.tinylm.int8_rows(x[rows].contiguous(), q, scales), together[rows])


def test_row_slice_of_the_weight_and_bad_shapes():
    x, q, scales = problem(2, 96, 64, seed=3)
    whole = torch.ops.tinylm.int8_rows(x, q, scales)
    assert torch.equal(torch.ops.tinylm.int8_rows(x, q[32:80], scales[32:80]), whole[:, 32:80])
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.tinylm.int8_rows(x[:, :40].contiguous(), q[:, :40], scales)


def test_int8_layer_runs_on_it_and_matches_its_dequantized_weight():
    from tinylm.quant.linear import Int8Linear

    w = torch.randn(80, 64)
    layer = Int8Linear.from_float(w, dtype=torch.float32)
    assert layer.use_rows_kernel
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)
