"""compressed-tensors checkpoints (tinylm/quant/compressed_tensors.py, ct_layout.py): tinylm writes int8 and int4
policies that transformers loads, live, to tinylm's logits; tinylm reads them back into its quantized layers with
no float weight; tinylm's own layout (mixed policies) makes transformers refuse instead of running random weights.

The `compressed-tensors` package is a test oracle only (tinylm never imports it): the packed layout is checked
against its compressors, and transformers needs it to load such a folder."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

import tinylm
from tinylm.cli import main
from tinylm.errors import ConfigError
from tinylm.quant import ct_layout
from tinylm.quant.checkpoint import save_quantized
from tinylm.quant.compressed_tensors import compressed_form, quantize_compressed, save_compressed_tensors
from tinylm.quant.linear import Int4Linear, Int8Linear
from tinylm.quant.policy import parse_policy

needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="the compressed-tensors package (a test dependency: pip install "
                                     "compressed-tensors) is not installed; transformers needs it to load such "
                                     "folders")
IDS = torch.tensor([[5, 17, 99, 300, 2, 64, 128, 7], [9, 8, 7, 6, 5, 4, 3, 2]])
# tied head + q/k/v biases (Qwen2), untied head (Llama); policies with float32 kernels, so the comparison with
# transformers' dequantized float32 weights is one of arithmetic order only, and one with tinylm's default kernels
CASES = [("qwen2", "int8:kernel_dtype=model"), ("llama", "int4:kernel_dtype=model,group_size=32"),
         ("qwen2", "int4:kernel_dtype=model"), ("llama", "int8")]


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return {arch: tiny_folder(arch, 3) for arch in ("qwen2", "llama")}


def _compressed(folder, spec: str, dtype: str = "float32"):
    llm = tinylm.load(folder, dtype=dtype)
    quantize_compressed(llm.model, parse_policy(spec))
    return llm


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


@needs_ct
@pytest.mark.parametrize("arch,spec", CASES)
def test_transformers_loads_tinylm_compressed_tensors_with_its_logits(tiny, tmp_path, arch, spec):
    from transformers import AutoModelForCausalLM

    llm = _compressed(tiny[arch], spec)
    folder = save_compressed_tensors(llm.model, tmp_path / "ct", llm.tokenizer)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # the layout, bit for bit: the tensors transformers holds (it keeps them packed and decompresses them in each
    # forward), decoded by compressed-tensors, are exactly the weights tinylm's layers stand for
    for name, layer in _quantized_layers(llm.model).items():
        module = hf.get_submodule(name)
        parts = {n: getattr(module, n) for n in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(parts, module.quantization_scheme)["weight"]
        assert torch.equal(weight.float(), layer.dequantize()), name
    with torch.no_grad():
        expected = hf(IDS).logits
    # transformers multiplies float32 inputs by the decoded float32 weights. tinylm's int8 layers with float32
    # kernels differ from that in the order of float32 sums only (~1e-6 on logits of size ~1); its default kernels
    # compute in bfloat16 (8-bit mantissa: ~2^-8 relative per product), and its int4 kernel quantizes each input
    # row to int8 by blocks of 32 (Q8_0: up to half of 1/127 of a block's largest value per input)
    tolerance = 1e-4 if spec.startswith("int8:kernel_dtype=model") else 2e-2
    torch.testing.assert_close(llm.forward(IDS).logits, expected, rtol=tolerance, atol=tolerance)


@needs_ct
@pytest.mark.parametrize("arch,spec", CASES)
def test_tinylm_reloads_compressed_tensors_into_quantized_layers(tiny, tmp_path, arch, spec):
    llm = _compressed(tiny[arch], spec)
    folder = save_compressed_tensors(llm.model, tmp_path / "ct", llm.tokenizer)
    again = tinylm.load(folder, dtype="float32")
    layers, before = _quantized_layers(again.model), _quantized_layers(llm.model)
    assert {n: type(m) for n, m in layers.items()} == {n: type(m) for n, m in before.items()}
    assert len(layers) == 7 * again.model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert isinstance(again.model.model.embed_tokens, nn.Embedding)  # the format keeps it in float
    for name, layer in layers.items():  # no float copy of a quantized weight is kept
        floats = [t for t in layer.state_dict().values() if t.is_floating_point() and t.dim() == 2]
        assert all(t.numel() < layer.in_features * layer.out_features for t in floats), name
        assert layer.weight.numel() == 0 and torch.equal(layer.dequantize(), before[name].dequantize())
    assert torch.equal(again.forward(IDS).logits, llm.forward(IDS).logits)
    params = tinylm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert again.generate("Once upon", params)[0].token_ids == llm.generate("Once upon", params)[0].token_ids


def test_transformers_refuses_tinylm_mixed_layout(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    llm = tinylm.load(tiny["qwen2"], quantize="qkv-fp16")
    folder = save_quantized(llm.model, tmp_path / "q", parse_policy("qkv-fp16"), llm.tokenizer)
    with pytest.raises(ValueError, match=r"tinylm's own quantized layout, policy qkv-fp16: load it with tinylm.load"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(tinylm.load(folder).forward(IDS).logits, llm.forward(IDS).logits)  # tinylm still reads it


@needs_ct
@pytest.mark.parametrize("bits,cols", [(4, 64), (4, 36), (8, 64), (8, 37)])
def test_packing_is_compressed_tensors_own(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    low = -(1 << (bits - 1))
    values = torch.randint(low, -low, (5, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    unsigned = (values.to(torch.int16) - low).to(torch.uint8)
    packed = ct_layout.pack_rows(unsigned, bits)
    assert torch.equal(packed, pack_to_int32(values, bits))
    assert torch.equal(ct_layout.unpack_rows(packed, bits, cols), unsigned)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, cols])), values)


@needs_ct
def test_config_is_compressed_tensors_own():
    from compressed_tensors.quantization import QuantizationConfig

    for scheme in (ct_layout.WeightScheme(8, None, True, True), ct_layout.WeightScheme(4, 128, True, True)):
        written = ct_layout.config_for(scheme, ["lm_head"])
        parsed = QuantizationConfig.model_validate(written)
        assert parsed.config_groups["group_0"].weights.num_bits == scheme.bits
        assert ct_layout.scheme_of(parsed.model_dump(), "here") == scheme


@needs_ct
def test_tinylm_reads_asymmetric_int4_written_by_compressed_tensors(tiny, tmp_path):
    """A W4A16 checkpoint with zero points, packed by the compressed-tensors package itself (as llm-compressor
    writes them): tinylm's Int4Linear holds it exactly (zero = -zero_point * scale)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    llm = _compressed(tiny["llama"], "int4:kernel_dtype=model,group_size=32")
    folder = save_compressed_tensors(llm.model, tmp_path / "ct", llm.tokenizer)
    from safetensors.torch import load_file, save_file

    state, expected = load_file(folder / "model.safetensors"), {}
    generator = torch.Generator().manual_seed(0)
    for name in _quantized_layers(llm.model):
        rows, cols = state[f"{name}.weight_shape"].tolist()
        weight = torch.randn(rows, cols, generator=generator) * 0.05 + 0.02  # off-centre: zero points matter
        groups = weight.reshape(rows, -1, 32)
        scale = (groups.amax(-1) - groups.amin(-1)) / 15
        zero_point = (-8 - groups.amin(-1) / scale).round().clamp(-8, 7).to(torch.int8)
        parts = PackedQuantizationCompressor.compress(
            {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
        expected[name] = PackedQuantizationCompressor.decompress(
            {**parts, "weight_zero_point": parts["weight_zero_point"]}, scheme)["weight"]
        state.update({f"{name}.{k}": v for k, v in parts.items()})
    save_file(state, str(folder / "model.safetensors"))
    (folder / "SHA256SUMS").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (folder / "config.json").write_text(json.dumps(config))
    again = tinylm.load(folder, dtype="float32")
    # Int4Linear keeps scales and zeros in its kernel's dtype (bfloat16 or float16 at most 2^-8 relative error on
    # the scale; |w| < 0.3 here): far below one quantization step (the scale, ~0.02) that a wrong value would cost
    for name, layer in _quantized_layers(again.model).items():
        torch.testing.assert_close(layer.dequantize(), expected[name], rtol=0, atol=2e-3)


def test_policies_the_format_cannot_hold(tiny, tmp_path):
    for spec, message in [("qkv-fp16", "mixes fp16 and int4 layers"), ("w8a8", "quantizes activations"),
                          ("int4:mlp_chunk=64", "load-time options")]:
        with pytest.raises(ConfigError, match=message):
            compressed_form(parse_policy(spec))
    asymmetric = tinylm.load(tiny["qwen2"], quantize="int4")  # tinylm's own int4: float zero points
    with pytest.raises(ConfigError, match="int8 embedding|Int8Embedding|zero points"):
        save_compressed_tensors(asymmetric.model, tmp_path / "bad")
    assert compressed_form(parse_policy("int8")).embedding == "float"


def test_unsupported_compressed_tensors_config_is_one_line(tiny, tmp_path):
    llm = _compressed(tiny["qwen2"], "int8")
    folder = save_compressed_tensors(llm.model, tmp_path / "ct", llm.tokenizer)
    config = json.loads((folder / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(ConfigError, match="is not weight-only over Linear layers") as info:
        tinylm.load(folder)
    assert "\n" not in str(info.value)


@needs_ct
def test_quantize_command_writes_compressed_tensors(tiny, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["quantize", str(tiny["qwen2"]), str(out), "--policy", "int4", "--format", "compressed-tensors",
                 "--dtype", "float32"]) == 0
    assert "compressed-tensors, policy int4, embedding and head in float" in capsys.readouterr().out
    loaded = tinylm.load(out)
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert loaded.loaded.metadata["quantization_layout"] == "compressed-tensors"
    assert main(["quantize", str(tiny["qwen2"]), str(tmp_path / "mixed"), "--policy", "qkv-fp16",
                 "--format", "compressed-tensors"]) == 1
    assert "mixes fp16 and int4 layers" in capsys.readouterr().err
