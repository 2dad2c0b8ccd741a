"""Quantized layers against a dequantized reference: int8 per channel and by groups, int4 at several group sizes,
float32 and bfloat16 activations, odd batch sizes and shapes; lookups, packing, chunking and state dicts."""

from __future__ import annotations

import pytest
import torch

from tinylm.model.fuse import concat_rows
from tinylm.quant import int4pack
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
    expected = x.to(kernel).float() @ w.T + bias.to(dtype).float()
    _close(y, expected, kernel)
    # the quantization itself is close to the float weight (4 bits: within half a step of each group's range)
    step = (weight.abs().max() / 127) if kind.startswith("int8") else (weight.max() - weight.min()) / 15
    assert (w - weight).abs().max() <= step * 0.51 + 0.02


@pytest.mark.parametrize("rows", [16, 40, 100, 4096 + 48])
def test_int4_kernel_layout_round_trip(rows):
    """Packing for the kernel and reading back (whole, or any rows) gives the values back, on this CPU's layout,
    including the partial last block and chunks across the 4096-row packing boundary."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (rows, 64), dtype=torch.uint8, generator=g)
    packed = int4pack.to_kernel(torch.cat([q, torch.zeros(-rows % 16, 64, dtype=torch.uint8)]))
    assert torch.equal(int4pack.from_kernel(packed, 64)[:rows], q)
    ids = torch.randint(0, rows, (3, 5), generator=g)
    assert torch.equal(int4pack.gather_rows(packed, ids, 64), q[ids])
    assert torch.equal(int4pack.unpack_portable(int4pack.pack_portable(q)), q)


def _reference_pack(q: torch.Tensor, layout: int4pack.Layout) -> torch.Tensor:
    """aten/src/ATen/native/cpu/int4mm_kernel.cpp weight_to_int4pack_kernel, written out: per block of B rows and
    per k, a full block (AVX2/AVX512) stores row j | row j + B/2 << 4; others store row n | row n + 1 << 4."""
    out = []
    for start in range(0, q.shape[0], layout.block):
        rows = q[start:start + layout.block].T  # (K, nb)
        if layout.blocked and rows.shape[1] == layout.block:
            out.append(rows[:, :layout.block // 2] | rows[:, layout.block // 2:] << 4)
        else:
            out.append(rows[:, 0::2] | rows[:, 1::2] << 4)
    return torch.cat([o.reshape(-1) for o in out]).reshape(q.shape[0], -1)


@pytest.mark.parametrize("layout", [int4pack.Layout(64, True), int4pack.Layout(32, True), int4pack.Layout(32, False),
                                    int4pack.Layout(64, False)], ids=str)
def test_int4_readers_on_every_known_layout(layout):
    """AVX512, AVX2 and plain layouts (not only this CPU's) read back by both readers."""
    q = torch.randint(0, 16, (2 * 64 + 48, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    packed = _reference_pack(q, layout)
    assert torch.equal(int4pack.from_kernel(packed, 32, layout), q)
    ids = torch.tensor([[0, 31, 32, 63], [64, 150, 175, 100]])
    assert torch.equal(int4pack.gather_rows(packed, ids, 32, layout), q[ids])
    if layout == int4pack.kernel_layout():
        assert torch.equal(packed, int4pack.to_kernel(q))


def test_int4_padding_rows_are_cut():
    """out_features not a multiple of 16: padded for the kernel, invisible outside."""
    layer = Int4Linear.from_float(torch.randn(50, 64), None, group_size=32, dtype=F32, kernel_dtype=F32)
    assert layer.qweight.shape == (64, 32) and layer(torch.randn(2, 64)).shape == (2, 50)
    assert layer.dequantize().shape == (50, 64)
    assert layer.state_dict()["qweight"].shape == (50, 32)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_lookup_and_tied_head_share_one_table(kind):
    g = torch.Generator().manual_seed(2)
    table = as_embedding(LAYERS[kind](torch.randn(96, 128, generator=g), None, F32, F32))
    ids = torch.tensor([[0, 95, 17], [3, 3, 64]])
    torch.testing.assert_close(table(ids), table.dequantize()[ids])  # embedding rows, dequantized
    head = TiedHead(table)
    x = torch.randn(2, 3, 128, generator=g)
    torch.testing.assert_close(head(x), x @ table.dequantize().T, rtol=2e-5, atol=2e-4)
    assert head.weight.dtype == F32 and head.weight.numel() == 0  # the stand-in engine code reads for dtype
    assert list(head.state_dict()) == []  # the table is stored once, by the embedding


@pytest.mark.parametrize("kind", list(LAYERS))
def test_row_chunks_split_and_fuse_give_the_same_outputs(kind):
    g = torch.Generator().manual_seed(3)
    layer = LAYERS[kind](torch.randn(192, 256, generator=g), torch.randn(192, generator=g), F32, F32)
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
    """The state dict holds portable tensors (int4: two values per byte, not the CPU's layout) and loads back."""
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
