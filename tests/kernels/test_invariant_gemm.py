"""tinylm's batch-invariant product (tinylm/kernels/invariant_gemm.cpp, the wrapper tinylm/kernels/invariant.py):
a row's output is bitwise the same whatever the number of rows, the other rows, its position, the thread count,
on every path the CPU has (AMX, AVX-512, portable), and it is F.linear within float32 / bfloat16 rounding; bias,
strided inputs, leading dims and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from tinylm import kernels
from tinylm.kernels import invariant

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")

ROWS = [1, 2, 3, 5, 16, 17, 64, 300]
DTYPES = [torch.float32, torch.bfloat16]
# (N, K, bias): the default model's (SmolLM2-135M) projections, then tails of every tile and chunk
MODEL_SHAPES = [(1536, 576, False), (576, 1536, False), (192, 576, True), (49152, 576, False)]
ODD_SHAPES = [(37, 100, True), (8, 5, False), (3, 33, True)]


def product(path, x, weight, bias):
    """The op ("auto": tinylm::invariant_linear) or one named path of it (amx, avx512, portable)."""
    if path == "auto":
        return torch.ops.tinylm.invariant_linear(x, weight, bias)
    return torch.ops.tinylm.invariant_linear_on(x, weight, bias, path)


def skip_unless_here(path, dtype):
    if path not in torch.ops.tinylm.invariant_linear_paths() or (path == "amx" and dtype != torch.bfloat16):
        pytest.skip(f"no {path} path for {dtype} on this CPU")


def make(shape, dtype, seed=0):
    n, k, with_bias = shape
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    probe = torch.randn(1, k, generator=gen).to(dtype)  # (1, K): the row whose output must not move
    return weight, bias, probe


def outputs_of_probe(path, weight, bias, probe, threads):
    """The probe row's output in every batch of ROWS (first, middle and last place, random companions)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        found = []
        for rows in ROWS:
            x = torch.randn(rows, probe.shape[1], generator=torch.Generator().manual_seed(rows)).to(probe.dtype)
            places = sorted({0, rows // 2, rows - 1})
            x[places] = probe
            out = product(path, x, weight, bias)
            found += [(rows, place, out[place]) for place in places]
        return found
    finally:
        torch.set_num_threads(previous)


def assert_invariant(path, shape, dtype):
    weight, bias, probe = make(shape, dtype)
    alone = product(path, probe, weight, bias)[0]  # (N,): M = 1
    for threads in (1, 2):
        for rows, place, row in outputs_of_probe(path, weight, bias, probe, threads):
            assert torch.equal(row, alone), f"row {place} of {rows} rows differs ({threads} threads)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MODEL_SHAPES + ODD_SHAPES)
def test_a_row_does_not_depend_on_its_batch(shape, dtype):
    assert_invariant("auto", shape, dtype)


@pytest.mark.parametrize("path", ["amx", "avx512", "portable"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(192, 576, True), (40, 64, True)] + ODD_SHAPES)
def test_every_path_is_invariant(path, shape, dtype):
    """Each path this CPU has, the ones the op does not pick here included (portable: CPUs without AVX-512)."""
    skip_unless_here(path, dtype)
    assert_invariant(path, shape, dtype)


@pytest.mark.parametrize("path", ["auto", "amx", "avx512", "portable"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MODEL_SHAPES[:3] + ODD_SHAPES)
def test_close_to_float64(path, shape, dtype):
    if path != "auto":
        skip_unless_here(path, dtype)
    weight, bias, _ = make(shape, dtype)
    x = torch.randn(40, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    out = product(path, x, weight, bias)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == dtype and out.shape == (40, shape[0])
    if dtype == torch.float32:  # float32 sums of K products
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=2e-6 * shape[1])
    else:  # exact bf16 products, float32 sums, one rounding to bfloat16 (2^-8 relative)
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("shape", [(192, 576, True), (37, 100, True)])
def test_bias_is_one_float32_add_after_the_sum(shape):
    weight, bias, _ = make(shape, torch.float32)
    x = torch.randn(7, shape[1])
    op = torch.ops.tinylm.invariant_linear
    assert torch.equal(op(x, weight, bias), op(x, weight, None) + bias)
    # bfloat16 x: a bias given in bfloat16 or as the same values in float32 is the same float32 add
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    assert torch.equal(op(xb, wb, bb), op(xb, wb, bb.float()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_the_contiguous_result(dtype):
    weight, bias, _ = make((64, 96, True), dtype)
    wide = torch.randn(9, 192).to(dtype)
    x = wide[:, ::2]  # (9, 96), not contiguous
    strided_weight = weight.t().contiguous().t()
    expected = torch.ops.tinylm.invariant_linear(x.contiguous(), weight, bias)
    assert torch.equal(torch.ops.tinylm.invariant_linear(x, strided_weight, bias), expected)


def test_wrapper_keeps_leading_dims_and_equals_the_op():
    weight, bias, _ = make((48, 64, True), torch.bfloat16)
    x = torch.randn(2, 3, 64).bfloat16()
    out = invariant.invariant_linear(x, weight, bias)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out.reshape(6, 48), torch.ops.tinylm.invariant_linear(x.reshape(6, 64), weight, bias))


@pytest.mark.parametrize("path", ["auto", "avx512", "portable"])
@pytest.mark.parametrize("shape", MODEL_SHAPES + ODD_SHAPES)
def test_bfloat16_weights_of_float32_rows_are_the_float32_product_of_the_widened_weight(path, shape):
    """float32 x against a bfloat16 weight (a float32 model's weights stored in bfloat16): bitwise the float32 path
    on weight.float() for every row count, a decode step's (widened in registers) and a prefill's (widened once)."""
    if path != "auto":
        skip_unless_here(path, torch.float32)
    weight, bias, _ = make(shape, torch.bfloat16)
    bias = None if bias is None else bias.float()
    for rows in ROWS:
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        out = product(path, x, weight, bias)
        assert out.dtype == torch.float32
        assert torch.equal(out, product(path, x, weight.float(), bias)), f"{rows} rows"


@pytest.mark.parametrize("shape", [(192, 576, True), (49152, 576, False)] + ODD_SHAPES)
def test_bfloat16_weights_of_float32_rows_are_batch_invariant(shape):
    weight, bias, probe = make(shape, torch.bfloat16)
    bias, probe = None if bias is None else bias.float(), probe.float()
    alone = product("auto", probe, weight, bias)[0]
    for threads in (1, 2):
        for rows, place, row in outputs_of_probe("auto", weight, bias, probe, threads):
            assert torch.equal(row, alone), f"row {place} of {rows} rows differs ({threads} threads)"


def test_refuses_what_it_cannot_compute():
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="weight in x's dtype or bfloat16"):
        torch.ops.tinylm.invariant_linear(torch.randn(2, 16).bfloat16(), weight)
    with pytest.raises(RuntimeError, match="x's K"):
        torch.ops.tinylm.invariant_linear(torch.randn(2, 15), weight)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.tinylm.invariant_linear(torch.randn(2, 16), weight, torch.randn(7))
    with pytest.raises(RuntimeError, match="no path 'amx'"):
        torch.ops.tinylm.invariant_linear_on(torch.randn(2, 16), weight, None, "amx")  # bfloat16 only


def test_wrapper_falls_back_to_f_linear_with_one_warning(monkeypatch):
    monkeypatch.setattr(invariant, "_WARNED", set())
    x, weight = torch.randn(3, 16).half(), torch.randn(8, 16).half()  # float16: not a kernel dtype
    with pytest.warns(RuntimeWarning, match="float32 or bfloat16"):
        out = invariant.invariant_linear(x, weight)
    assert torch.equal(out, F.linear(x, weight))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        invariant.invariant_linear(x, weight)  # the second time: silent


@pytest.mark.parametrize("dtype", DTYPES)
def test_inside_torch_compile(dtype):
    weight, bias, _ = make((192, 576, True), dtype)

    def layer(x):
        return invariant.invariant_linear(x, weight, bias) * 2

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (3, 17):
        x = torch.randn(1, rows, 576).to(dtype)
        out, code = run_and_get_code(compiled, x)
        assert "invariant_linear" in "".join(code)
        assert torch.equal(out, layer(x))


def test_gradients_are_the_linear_ones():
    weight, bias, _ = make((24, 40, True), torch.float32)
    x = torch.randn(5, 40)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    (invariant.invariant_linear(*leaves) ** 2).sum().backward()
    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    (F.linear(*expected) ** 2).sum().backward()
    # the gradients carry the forward's output (2 * out), whose float32 sums run in another order than F.linear's:
    # a few 1e-5 apart on some random draws (the suite's order changes the draw), far below a wrong formula's error
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-4, atol=2e-4)
