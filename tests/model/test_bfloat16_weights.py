"""A GGUF file run in float32 on a CPU without native bfloat16 stores its linear weights in bfloat16
(tinylm/llm_loading.py resolve_weight_dtype, tinylm/model/invariant.py store_bfloat16): the model still computes in
float32, and every product is bitwise the float32 product of the weight rounded to bfloat16 once, so its logits and
tokens are exactly those of a float32 model holding the rounded weights. Checked on every host by pretending the CPU
has no native bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tinylm
from tinylm import SamplingParams, kernels, llm_loading
from tinylm.llm_loading import resolve_weight_dtype

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs tinylm's kernels (a C++ compiler)")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)


def test_only_auto_on_a_gguf_file_without_native_bfloat16_narrows_weights(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: False)
    assert resolve_weight_dtype("auto", gguf, "cpu", None) == torch.bfloat16
    assert resolve_weight_dtype("float32", gguf, "cpu", None) is None  # asked for float32: float32 weights
    assert resolve_weight_dtype("auto", gguf, "cpu", "int4") is None  # a policy decides the layers' formats
    assert resolve_weight_dtype("auto", tmp_path, "cpu", None) is None  # a folder: its own dtype
    assert resolve_weight_dtype("auto", gguf, "cuda", None) is None
    monkeypatch.setattr(llm_loading, "native_bf16", lambda device: True)
    assert resolve_weight_dtype("auto", gguf, "cpu", None) is None  # computes in bfloat16 there


def rounded_float32_model(path: Path):
    """The float32 model with every linear weight rounded to bfloat16 and back (the reference)."""
    llm = tinylm.load(path, dtype="float32", compile=False)
    with torch.no_grad():
        for module in llm.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.to(torch.bfloat16).float()
    return llm


def test_bfloat16_weights_give_the_float32_model_of_the_rounded_weights(no_native_bf16, smollm2_gguf):
    llm = tinylm.load(smollm2_gguf, compile=False)
    model = llm.model
    assert llm.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16  # the tied embedding / head: 28 M values in 16 bits
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    reference = rounded_float32_model(smollm2_gguf)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345], [1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = llm.model(ids).logits
        assert logits.dtype == torch.float32
        assert torch.equal(logits, reference.model(ids).logits)
        assert torch.equal(llm.model(ids[:1]).logits[0], logits[0])  # batch invariant
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,"]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in reference.generate(prompts, params)]


def test_an_explicit_float32_keeps_float32_weights(no_native_bf16, default_llm):
    assert default_llm.model.lm_head.weight.dtype == torch.float32
    assert default_llm.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
