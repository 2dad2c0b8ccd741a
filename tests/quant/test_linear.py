"""Quantized layers against a dequantized reference: int8 per channel and by groups, int4 at several group sizes,
float32 and bfloat16 activations, odd batch sizes and shapes; lookups, packing, chunking and state dicts."""

from __future__ import annotations

import pytest
import torch

from tinylm.model.fuse import concat_rows
from tinylm.quant.chunked import split_cols, split_rows
from tinylm.quant.embedding import TiedHead, as_embedding
from tinylm.quant.linear import Int4Linear, Int8Linear

F32, BF16 = torch.float32, torch.bfloat16
# (model dtype, kernel dtype): fp32 exact, fp32 model on the bf16 kernels (the CPU default), bf16
DTYPES = [(F32, F32), (F32, BF16), (BF16, BF16)]
LAYERS = {  # name -> builder(weight, bias, dtype, kernel_dtype)
    "int8": lambda w, b, d, k: Int8Linear.from_float(w, b, dtype=d, kernel_dtype=k),
    "int8-g32": lambda w, b, d, k: Int8Linear.from_float(w, b, group_size=32, dtype=d, kernel_dtype=k),
    "int4-g32": lambda w, b, d, k: Int4Linear.from_float(w, b, group_size=32, dtype=d, kernel_dtype=k),
    "int4-g64": lambda w, b, d, k: Int4Linear.from_float(w, b, group_size=64, dtype=d, kernel_dtype=k),
    "int4-g128": lambda w, b, d, k: Int4Linear.from_float(w, b, group_size=128, dtype=d, kernel_dtype=k),
}


def _as_kernel_sees(kind: str, x: torch.Tensor, kernel: torch.dtype) -> torch.Tensor:
    """Inputs as the layer's arithmetic sees them, float32: int4 layers on 16-bit kernel dtypes quantize each row
    in blocks of 32 features as llama.cpp's Q8_0 (tinylm/kernels/int4_gemm.cpp; the exact arithmetic:
    tests/kernels/test_int4_gemm.py); float32 kernels multiply the dequantized weight in float."""
    x = x.to(kernel)
    if not kind.startswith("int4") or kernel == F32:
        return x.float()
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    dx = blocks.abs().amax(-1, keepdim=True) / 127.0
    xq = (blocks * torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))).round().clamp(-127, 127)
    return (xq * dx).reshape(x.shape)


def _close(actual: torch.Tensor, expected: torch.Tensor, kernel: torch.dtype) -> None:
    """fp32 kernels: to float rounding; bf16 ones: to bf16 rounding of inputs/outputs, relative to the scale."""
    scale = expected.abs().max().item()
    tol = 2e-5 if kernel == F32 and actual.dtype == F32 else 1.5e-2
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "fp32-bf16kernel", "bf16"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (2, 7, 256)], ids=["batch1", "batch3", "3d-odd"])
def test_layer_matches_dequantized_reference(kind, dtypes, shape):
    dtype, kernel = dtypes
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(72, 256, generator=g), torch.randn(72, generator=g)  # 72 rows: int4 pads to 80
    layer = LAYERS[kind](weight, bias, dtype, kernel)
    x = torch.randn(*shape, generator=g).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 72)
    w = layer.dequantize()  # float32 (N, K) as the kernel sees it
    expected = _as_kernel_sees(kind, x, kernel) @ w.T + bias.to(dtype).float()
    _close(y, expected, kernel)
    # int8 activations (int4 layers) stay within 1.5% of the float product
    torch.testing.assert_close(y.float(), x.to(kernel).float() @ w.T + bias.to(dtype).float(), rtol=0,
                               atol=1.5e-2 * expected.abs().max().item())
    # the quantization itself is close to the float weight (4 bits: within half a step of each group's range)
    step = (weight.abs().max() / 127) if kind.startswith("int8") else (weight.max() - weight.min()) / 15
    assert (w - weight).abs().max() <= step * 0.51 + 0.02


def test_int4_padding_rows_are_cut():
    """out_features not a multiple of 16: padded for the kernel, invisible outside."""
    layer = Int4Linear.from_float(torch.randn(50, 64), None, group_size=32, dtype=F32, kernel_dtype=F32)
    assert layer.qweight.shape == (64, 32) and layer(torch.randn(2, 64)).shape == (2, 50)
    assert layer.scales_mins.shape == (4, 2, 2, 16)  # (N_pad / 16, G, scale / min, 16) float16
    assert layer.dequantize().shape == (50, 64)
    assert layer.state_dict()["qweight"].shape == (50, 32)


def test_int4_blocks_as_stored_survive_fusing_and_splitting():
    """GGUF Q4_1 blocks (w = d * q + m, d and m float16) keep their exact d and m through concat_rows (the fused
    q/k/v and gate/up projections) and split_rows: the layer runs the file's own numbers."""
    g = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (40, 64), dtype=torch.uint8, generator=g)
    d, m = (torch.rand(40, 2, generator=g) * 0.05).half().float(), (-torch.rand(40, 2, generator=g)).half().float()
    layer = Int4Linear(q, d, None, dtype=F32, mins=m)
    fused = concat_rows([layer, Int4Linear(q[:24], d[:24], None, dtype=F32, mins=m[:24])])
    for part, (a, b) in zip(split_rows(fused, [(0, 40), (40, 64)]), [(0, 40), (0, 24)]):
        pq, pd, pm = part.parts()
        assert torch.equal(pq, q[a:b]) and torch.equal(pd, d[a:b]) and torch.equal(pm, m[a:b])
    w = (q.float().reshape(40, 2, 32) * d[..., None] + m[..., None]).reshape(40, 64)
    assert torch.equal(layer.dequantize(), w)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("kernel", [F32, BF16])
def test_lookup_and_tied_head_share_one_table(kind, kernel):
    if kernel == BF16 and not kind.startswith("int4"):
        pytest.skip("the bf16-kernel case is int4's integer kernel; int8 layers are checked on float32 kernels")
    g = torch.Generator().manual_seed(2)
    table = as_embedding(LAYERS[kind](torch.randn(96, 128, generator=g), None, F32, kernel))
    ids = torch.tensor([[0, 95, 17], [3, 3, 64]])
    torch.testing.assert_close(table(ids), table.dequantize()[ids])  # embedding rows, dequantized
    head = TiedHead(table)
    x = torch.randn(2, 3, 128, generator=g)
    expected = _as_kernel_sees(kind, x, kernel) @ table.dequantize().T
    _close(head(x), expected, kernel)
    assert head.weight.dtype == F32 and head.weight.numel() == 0  # the stand-in engine code reads for dtype
    assert list(head.state_dict()) == []  # the table is stored once, by the embedding


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("kernel", [F32, BF16])
def test_row_chunks_split_and_fuse_give_the_same_outputs(kind, kernel):
    if kernel == BF16 and not kind.startswith("int4"):
        pytest.skip("the bf16-kernel case is int4's integer kernel; int8 layers are checked on float32 kernels")
    g = torch.Generator().manual_seed(3)
    layer = LAYERS[kind](torch.randn(192, 256, generator=g), torch.randn(192, generator=g), F32, kernel)
    x = torch.randn(3, 256, generator=g)
    whole = layer(x)
    layer.row_chunk = 64
    torch.testing.assert_close(layer(x), whole, rtol=0, atol=0)
    bounds = [(0, 64), (64, 192)]
    pieces = split_rows(layer, bounds)
    torch.testing.assert_close(torch.cat([p(x) for p in pieces], -1), whole, rtol=0, atol=0)
    torch.testing.assert_close(concat_rows(pieces)(x), whole, rtol=0, atol=0)
    cols = split_cols(layer, [(0, 128), (128, 256)])
    torch.testing.assert_close(cols[0](x[:, :128]) + cols[1](x[:, 128:]), whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_state_dict_round_trip(kind, dtype):
    """The state dict holds portable tensors (int4: two values per byte, not the kernel's tiles) and loads back."""
    g = torch.Generator().manual_seed(4)
    layer = LAYERS[kind](torch.randn(48, 128, generator=g), torch.randn(48, generator=g), dtype, dtype)
    state = layer.state_dict()
    if kind.startswith("int4"):
        assert set(state) == {"qweight", "scales", "zeros", "bias"} and state["qweight"].shape == (48, 64)
    fresh = LAYERS[kind](torch.zeros(48, 128), torch.zeros(48), dtype, dtype)
    fresh.load_state_dict(state)
    x = torch.randn(5, 128, generator=g).to(dtype)
    assert torch.equal(fresh(x), layer(x))


def test_forward_compiles_without_graph_breaks():
    """No data-dependent Python control flow: torch.compile traces a quantized layer and its lookup in one graph."""
    torch._dynamo.reset()
    layer = as_embedding(Int4Linear.from_float(torch.randn(64, 64), None, group_size=32, dtype=BF16,
                                               kernel_dtype=BF16))
    explain = torch._dynamo.explain(lambda ids: layer.matmul(layer(ids)))(torch.tensor([[1, 5, 63]]))
    assert explain.graph_break_count == 0


@pytest.mark.parametrize("offset", [8, 24])
def test_int8_weights_read_from_anywhere_are_aligned_for_the_kernel(offset):
    """A qweight that does not start on a 64-byte boundary (a tensor inside a safetensors file) is copied: the
    AVX-512 kernel of torch 2.13 uses aligned loads for several rows and crashed the process on such weights."""
    torch.manual_seed(0)
    reference = Int8Linear.from_float(torch.randn(512, 64), dtype=BF16)
    buffer = torch.empty(512 * 64 + 128, dtype=torch.int8)
    start = -buffer.data_ptr() % 64 + offset
    misaligned = buffer[start:start + 512 * 64].view(512, 64)
    misaligned.copy_(reference.qweight)
    layer = Int8Linear(misaligned, reference.scales, dtype=BF16)
    assert layer.qweight.data_ptr() % 64 == 0
    x = torch.randn(4, 64, dtype=BF16)
    _close(layer(x), x.float() @ reference.dequantize().T, BF16)
