"""Quantized models end to end on tiny random checkpoints of each family: the whole quantized forward equals a float
forward over the dequantized weights; saved checkpoints load back to the same logits; policies act as named."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tinylm
from tinylm.errors import ConfigError, WeightsError
from tinylm.quant.apply import quantize_model
from tinylm.quant.checkpoint import save_quantized
from tinylm.quant.chunked import ChunkedMLP
from tinylm.quant.embedding import TiedHead
from tinylm.quant.linear import HalfLinear, Int4Linear, Int8Linear, QuantLinearBase
from tinylm.quant.policy import parse_policy

POLICIES = ["int8", "int4", "qkv-fp16", "int4-tiedq"]
IDS = torch.tensor([[5, 17, 99, 300, 2, 64, 128, 7], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    folders = {}
    # tied + q/k/v bias, untied head, hybrid DeltaNet + MoE, tied head with its own bias
    for arch in ("qwen2", "llama", "qwen3_next", "qed"):
        folders[arch] = tiny_folder(arch, 1)
    return folders


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every quantized layer replaced by a float Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinearBase):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize()
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            if name == "model.embed_tokens":
                linear = nn.Embedding.from_pretrained(module.dequantize())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)
    if isinstance(model.lm_head, TiedHead):
        bias = model.lm_head.bias
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=bias is not None)
        model.lm_head.weight = model.model.embed_tokens.weight
        if bias is not None:
            model.lm_head.bias = bias
    return model


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3_next", "qed"])
def test_quantized_forward_is_the_float_forward_of_dequantized_weights(tiny, arch, policy):
    spec = f"{policy}:kernel_dtype=model"  # float32 kernels: the comparison is exact up to rounding
    if arch == "qwen3_next" and policy != "int8":
        spec += ",group_size=32"  # its shared expert is 32 wide
    quantized = tinylm.load(tiny[arch], quantize=spec).model
    logits = quantized(IDS).logits
    reference = _dequantized_copy(tinylm.load(tiny[arch], quantize=spec).model)(IDS).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    float_logits = tinylm.load(tiny[arch]).forward(IDS).logits
    assert (logits - float_logits).abs().max() < 0.5 * float_logits.abs().max()  # and still near the float model


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_choose_the_layers_they_name(tiny, policy):
    model = tinylm.load(tiny["qwen2"], quantize=policy).model
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    body = Int8Linear if policy == "int8" else Int4Linear
    assert type(mlp.down_proj) is body and type(attn.o_proj) is body
    assert type(attn.q_proj) is (HalfLinear if policy == "qkv-fp16" else body)
    if policy == "qkv-fp16":
        assert attn.q_proj.weight.dtype == torch.float16 and attn.q_proj(torch.randn(2, 64)).dtype == torch.float32
    table = model.model.embed_tokens
    assert isinstance(table, Int4Linear if policy == "int4-tiedq" else Int8Linear)
    assert isinstance(model.lm_head, TiedHead) and model.lm_head.table is table  # one copy, also the head
    assert model.lm_head.weight.dtype == torch.float32  # what the engine reads for the KV cache dtype


@pytest.mark.parametrize("policy", POLICIES + ["int4:group_size=32,head_chunk=128"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_checkpoint_loads_back_to_the_same_logits(tiny, tmp_path, arch, policy):
    llm = tinylm.load(tiny[arch], dtype="bfloat16", quantize=policy)
    save_quantized(llm.model, tmp_path / "q", parse_policy(policy), llm.tokenizer)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["spec"] == policy
    assert (tmp_path / "q" / "SHA256SUMS").is_file() and (tmp_path / "q" / "tokenizer.json").is_file()
    again = tinylm.load(tmp_path / "q", dtype="bfloat16")
    assert torch.equal(again.forward(IDS).logits, llm.forward(IDS).logits)
    params = tinylm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert again.generate("Once upon", params)[0].token_ids == llm.generate("Once upon", params)[0].token_ids


def test_load_time_options_of_a_saved_checkpoint(tiny, tmp_path):
    policy = "int4:kernel_dtype=model"
    llm = tinylm.load(tiny["qwen2"], quantize=policy)
    save_quantized(llm.model, tmp_path / "q", parse_policy(policy), llm.tokenizer)
    expected = llm.forward(IDS).logits
    chunked = tinylm.load(tmp_path / "q", quantize="int4:mlp_chunk=64,head_chunk=256")  # kernel_dtype kept
    assert isinstance(chunked.model.model.layers[0].mlp, ChunkedMLP)
    assert chunked.model.model.embed_tokens.row_chunk == 256
    torch.testing.assert_close(chunked.forward(IDS).logits, expected, rtol=1e-4, atol=1e-4)
    for bad in ("int8", "int4:group_size=32"):
        with pytest.raises(ConfigError, match="already quantized with policy 'int4:kernel_dtype=model'"):
            tinylm.load(tmp_path / "q", quantize=bad)
    with pytest.raises(ConfigError, match="save the model before mlp_chunk"):
        save_quantized(chunked.model, tmp_path / "again", parse_policy("int4"))


def test_format_1_folders_still_load(tiny, tmp_path):
    """Folders written before the refusal for other tools (quant_method "tinylm", no tinylm_format) load as before."""
    llm = tinylm.load(tiny["qwen2"], quantize="int8")
    folder = save_quantized(llm.model, tmp_path / "q", parse_policy("int8"), llm.tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["quantization_config"]["tinylm_format"]
    qc = config["quantization_config"]
    config["quantization_config"] = {"quant_method": "tinylm", "format_version": 1, "spec": qc["spec"],
                                     "policy": qc["policy"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "SHA256SUMS").unlink()
    assert torch.equal(tinylm.load(folder).forward(IDS).logits, llm.forward(IDS).logits)


def test_corrupt_quantized_checkpoint_gives_one_line(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    llm = tinylm.load(tiny["qwen2"], quantize="int4")
    folder = save_quantized(llm.model, tmp_path / "q", parse_policy("int4"), llm.tokenizer)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.up_proj.scales"] = state["model.layers.0.mlp.up_proj.scales"][:100].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="SHA-256 does not match"):
        tinylm.load(folder)
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(WeightsError, match=r"up_proj.scales has shape \(100, 1\)") as info:
        tinylm.load(folder)
    assert "\n" not in str(info.value)


def test_quantize_a_loaded_model_in_place(tiny):
    llm = tinylm.load(tiny["llama"])
    expected = tinylm.load(tiny["llama"], quantize="int8").forward(IDS).logits
    quantize_model(llm.model, "int8")
    assert type(llm.model.lm_head) is Int8Linear  # untied head: its own int8 layer
    assert torch.equal(llm.forward(IDS).logits, expected)
