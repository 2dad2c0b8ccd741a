"""W8A8 (policy `w8a8`: int8 weights per channel, inputs quantized to int8 per token, SmoothQuant calibration):
the layer computes what its definition says, on tinylm's VNNI kernel, oneDNN's packed path and the
fallback alike; smoothing keeps
the float product and cuts the error where inputs have outlier features; models of each family load, fuse,
save and load back; bad requests are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

import tinylm
from tinylm.errors import ConfigError
from tinylm.model.fuse import fuse_projections
from tinylm.quant import int8_matmul
from tinylm.quant.apply import quantize_model
from tinylm.quant.checkpoint import save_quantized
from tinylm.quant.linear import Int8Linear
from tinylm.quant.policy import parse_policy
from tinylm.quant.smooth import input_scales, sibling_groups

IDS = torch.tensor([[5, 17, 99, 300, 2, 64, 128, 7], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return {arch: tiny_folder(arch, 2) for arch in ("qwen2", "llama", "qwen3_next")}


def _reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The W8A8 definition in float64: x smoothed, rounded per row to 127 steps of max|x| / 127, times the
    dequantized int8 weight."""
    x = x.double() * (1 if layer.input_scale is None else layer.input_scale.double())
    step = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-10)
    xq = (x / step).round().clamp(-127, 127) * step
    weight = layer.qweight.double() * layer.scales.double()[:, None]
    return xq @ weight.T


PATHS = ["vnni", "onednn-packed", "int_mm-fallback"]


def _on_path(layer: Int8Linear, path: str) -> Int8Linear:
    """Put the layer's batched product on one implementation: tinylm's VNNI kernel (where it runs), oneDNN over
    the packed weight, or torch._int_mm."""
    if path == "vnni":
        if layer.weight_sums is None:
            pytest.skip("tinylm's VNNI kernel does not run here (no AVX-512 VNNI or no C++ toolchain)")
        return layer
    layer.weight_sums = None
    layer._packed = layer._prepack()
    if path == "int_mm-fallback":
        int8_matmul._PACKED.pop(layer._packed[0], None)
    return layer


@pytest.mark.parametrize("rows", [1, 3, 16, 21])
@pytest.mark.parametrize("path", PATHS)
def test_layer_is_its_definition(rows, path):
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(208, 96) * 0.05, None, dtype=torch.float32, activations="int8",
                                  input_scale=torch.rand(96) + 0.5)
    layer = _on_path(layer, path)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-3, atol=1e-4)


def test_every_path_gives_the_same_sums():
    torch.manual_seed(1)
    x, weight = torch.randn(16, 128), torch.randn(64, 128)
    outputs = []
    for path in PATHS:
        layer = Int8Linear.from_float(weight, None, dtype=torch.float32, activations="int8")
        if path == "vnni" and layer.weight_sums is None:
            continue
        outputs.append(_on_path(layer, path)(x))
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-6, atol=1e-6)  # exact int sums; scales applied alike


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_the_batched_int8_product_sums_exactly_at_full_range(rows):
    """Inputs near +-127 (where uint8 x int8 pair sums overflow int16): oneDNN's packed product saturated on x86
    without VNNI (off by ~1e5), so there tinylm must not prepack; whatever path this CPU takes, the sums are exact."""
    g = torch.Generator().manual_seed(rows)
    x = (torch.randint(0, 2, (rows, 256), generator=g) * 2 - 1).to(torch.int8) * 127  # all +-127
    weight = torch.randint(-127, 128, (48, 256), dtype=torch.int8, generator=g)
    handle, packed = int8_matmul.prepack(weight)
    out = int8_matmul.int8_mm((x.to(torch.int16) + 128).to(torch.uint8), weight, torch.ones(48), handle)
    assert torch.equal(out.double(), (x.double() @ weight.double().T))
    del packed


def test_layers_the_vnni_kernel_cannot_tile_use_onednn():
    layer = Int8Linear.from_float(torch.randn(200, 96), None, dtype=torch.float32, activations="int8")
    assert layer.weight_sums is None and layer._packed is not None  # 200 rows: not a multiple of 16


def test_copies_keep_a_working_batched_product():
    layer = Int8Linear.from_float(torch.randn(64, 32), None, dtype=torch.float32, activations="int8")
    onednn = _on_path(Int8Linear.from_float(torch.randn(64, 32), None, dtype=torch.float32, activations="int8"),
                      "onednn-packed")
    x = torch.randn(4, 32)
    for original in (layer, onednn):
        twin = copy.deepcopy(original)  # e.g. a DPO reference model: the opaque packed tensor cannot be copied
        if original._packed is not None:
            assert twin._packed[0] != original._packed[0]  # its own packed weight
        assert torch.equal(twin(x), original(x))


def test_smoothing_keeps_the_product_and_tames_outlier_features():
    torch.manual_seed(2)
    weight = torch.randn(128, 64) * 0.05
    x = torch.randn(32, 64)
    x[:, 3] *= 60  # one outlier feature, as RMSNorm weights make them
    plain = Int8Linear.from_float(weight, None, dtype=torch.float32, activations="int8")
    scale = x.abs().amax(dim=0) ** 0.5 / weight.abs().amax(dim=0) ** 0.5  # SmoothQuant's s, alpha = 0.5
    smoothed = Int8Linear.from_float(weight, None, dtype=torch.float32, activations="int8", input_scale=1 / scale)
    # each weight is back to half a quantization step, the step of its row scaled by its feature's factor
    bound = 0.5 * smoothed.scales.float()[:, None] / scale[None] + 1e-6
    assert ((smoothed.dequantize() - weight).abs() <= bound).all()
    exact = x @ weight.T
    error = lambda layer: (layer(x) - exact).norm() / exact.norm()  # noqa: E731
    assert error(smoothed) < 0.5 * error(plain)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3_next"])
def test_models_load_smoothed_and_stay_near_the_float_model(tiny, arch):
    llm = tinylm.load(tiny[arch], quantize="w8a8")
    table = llm.model.model.embed_tokens
    layers = [m for m in llm.model.modules() if isinstance(m, Int8Linear) and m is not table]
    assert layers and all(m.activations == "int8" for m in layers)
    # the table is also the head where they are tied; an untied one is only looked up: weight-only, not packed
    untied = arch == "llama"
    assert table.activations == ("float" if untied else "int8")
    assert (table._packed is None and table.weight_sums is None) == untied
    layer = llm.model.model.layers[0]
    if hasattr(layer, "self_attn"):
        attention = layer.self_attn
        assert attention.q_proj.input_scale is not None  # q/k/v read one input: one smoothing
        assert torch.equal(attention.q_proj.input_scale, attention.k_proj.input_scale)
    logits, float_logits = llm.forward(IDS).logits, tinylm.load(tiny[arch]).forward(IDS).logits
    assert (logits - float_logits).abs().max() < 0.25 * float_logits.abs().max()


def test_sibling_groups_are_the_layers_sharing_an_input(tiny):
    model = tinylm.load(tiny["qwen2"]).model
    groups = sibling_groups(model)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in groups
    assert ["lm_head"] in groups and sum(len(g) for g in groups) == 7 * model.config.num_hidden_layers + 1


def test_features_calibration_never_saw_are_not_amplified():
    layer = torch.nn.Linear(8, 4, bias=False)
    maxima = {"only": torch.tensor([5.0, 0.0, 2.0, 1e-9, 3.0, 4.0, 1.0, 2.0])}
    model = torch.nn.ModuleDict({"only": layer})
    scale = input_scales(model, maxima)["only"]
    assert scale[1] == 1 and scale[3] == 1  # unseen: left as they are
    assert scale[0] != 1 and torch.isfinite(scale).all()


def test_fused_w8a8_projections_keep_logits(tiny):
    llm = tinylm.load(tiny["qwen2"], quantize="w8a8")
    before = llm.forward(IDS).logits
    assert fuse_projections(llm.model) == 2 * llm.config.num_hidden_layers
    torch.testing.assert_close(llm.forward(IDS).logits, before, rtol=1e-4, atol=1e-4)


def test_saved_w8a8_checkpoint_loads_back_to_the_same_logits(tiny, tmp_path):
    llm = tinylm.load(tiny["qwen2"], dtype="bfloat16", quantize="w8a8")
    folder = save_quantized(llm.model, tmp_path / "q", parse_policy("w8a8"), llm.tokenizer)
    again = tinylm.load(folder, dtype="bfloat16")
    assert again.model.model.layers[0].mlp.down_proj.input_scale is not None
    assert torch.equal(again.forward(IDS).logits, llm.forward(IDS).logits)


def test_bad_w8a8_requests_are_one_line_errors(tiny):
    with pytest.raises(ConfigError, match="activations=int8 needs per-channel int8 weights"):
        parse_policy("w8a8:int8_group_size=32")
    with pytest.raises(ConfigError, match="activations must be one of float, int8"):
        parse_policy("int8:activations=int4")
    with pytest.raises(ConfigError, match="needs calibration tokens"):
        quantize_model(tinylm.load(tiny["llama"]).model, "w8a8")
