"""GGUF Q4_0 / Q4_1 / Q8_0 blocks loaded straight into quantized layers dequantize exactly as the gguf package does
(gguf.quants.dequantize, through tinylm's float GGUF loader which also undoes llama.cpp's q/k permutation)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import tinylm
from tests.weights.conftest import write_tiny
from tinylm.quant.linear import Int4Linear, Int8Linear
from tinylm.weights.gguf import load_gguf, open_gguf
from tinylm.weights.gguf_source import GGUFSource

# exact: kernels in float32 (kernel_dtype=model); 4-bit embedding too (int4-tiedq); Q8_0 kept in its groups of 32
EXACT = {Q.Q4_0: "int4-tiedq:kernel_dtype=model", Q.Q4_1: "int4-tiedq:kernel_dtype=model",
         Q.Q8_0: "int8:int8_group_size=32,kernel_dtype=model"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module", params=list(EXACT), ids=lambda q: q.name)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"{request.param.name}.gguf"
    write_tiny(path, arch="llama", qtype=request.param, seed=5)  # llama: q/k rows permuted in the file
    return request.param, path, load_gguf(path).tensors


def test_blocks_dequantize_exactly_as_gguf_does(tiny):
    qtype, path, reference = tiny
    model = tinylm.load(path, dtype="float32", quantize=EXACT[qtype]).model
    layer_type = Int8Linear if qtype == Q.Q8_0 else Int4Linear
    for name in LINEARS:
        layer = model.get_submodule(f"model.layers.0.{name}")
        assert type(layer) is layer_type and layer.group_size == 32
        assert torch.equal(layer.dequantize(), reference[f"model.layers.0.{name}.weight"]), name
    table = model.model.embed_tokens  # the tied head's table (260 rows: padded to 272 for int4)
    assert torch.equal(table.dequantize(), reference["model.embed_tokens.weight"])


def test_quantized_model_matches_the_float_model(tiny):
    """Same weights, float32 both: logits equal to float rounding; the bf16-kernel default stays close."""
    qtype, path, _ = tiny
    ids = torch.tensor([[1, 7, 42, 99, 3, 250]])
    expected = tinylm.load(path, dtype="float32").forward(ids).logits
    exact = tinylm.load(path, dtype="float32", quantize=EXACT[qtype]).forward(ids).logits
    torch.testing.assert_close(exact, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    default = tinylm.load(path, dtype="float32", quantize="int8" if qtype == Q.Q8_0 else "int4").forward(ids).logits
    if qtype != Q.Q8_0:
        # int4 multiplies int8-quantized activations (Q4 x Q8_0, tinylm/kernels/int4_gemm.cpp): ~0.7% per product
        # here, which this random one-layer model's near-hard attention (hidden values to 3e4) turns into large
        # logit changes; it must still pick the float model's tokens (the real model's bound: the quality gate)
        assert (default.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 2 / 3
        return
    scale = expected.abs().max().item()
    assert (default - expected).abs().max().item() < 0.05 * scale


def test_q8_0_to_int8_per_channel_is_within_half_a_step(tiny):
    """The fast default for Q8_0: one scale per row (the fused kernel), requantized from the exact values."""
    qtype, path, reference = tiny
    if qtype != Q.Q8_0:
        pytest.skip("Q8_0 only")
    layer = tinylm.load(path, dtype="float32", quantize="int8:kernel_dtype=model").model.model.layers[0].mlp.up_proj
    exact = reference["model.layers.0.mlp.up_proj.weight"]
    step = exact.abs().amax(dim=1, keepdim=True) / 127
    assert layer.group_size is None
    assert ((layer.dequantize() - exact).abs() <= step / 2 + 1e-7).all()


def test_real_file_blocks_are_exact(smollm2_gguf):
    """The default model's own Q4_1 and Q8_0 tensors, decoded as layers take them, against gguf.quants."""
    source = GGUFSource(open_gguf(smollm2_gguf))
    raw = {t.name: t for t in source.file.reader.tensors}
    for gguf_name, name in (("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                            ("token_embd.weight", "model.embed_tokens.weight")):
        tensor = raw[gguf_name]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (out, in): v_proj's rows are not permuted
        native = source.native(name, "int8" if tensor.tensor_type == Q.Q8_0 else "int4")
        if native.kind == "int4":
            layer = Int4Linear(native.q, native.scales, native.zeros, dtype=torch.float32)
        else:
            layer = Int8Linear(native.q, native.scales, dtype=torch.float32)
        assert torch.equal(layer.dequantize(), torch.from_numpy(np.asarray(expected, np.float32))), gguf_name
