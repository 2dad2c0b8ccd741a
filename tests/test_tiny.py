"""`tinylm tiny`: every family's tiny checkpoint loads in tinylm and generates; transformers agrees where it can."""

from __future__ import annotations

import pytest
import torch
import transformers

import tinylm
from tinylm.cli import main
from tinylm.tiny import FAMILIES, make_tiny

TRANSFORMERS_FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_next"]


def _supported(arch: str) -> bool:
    from tinylm.config import SUPPORTED_MODEL_TYPES

    return arch in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_tiny_loads_and_generates(arch, tmp_path):
    if not _supported(arch):
        pytest.skip(f"{arch} is not implemented in this checkout")
    assert main(["tiny", arch, str(tmp_path / arch), "--seed", "3"]) == 0
    llm = tinylm.load(tmp_path / arch)
    assert llm.config.model_type == arch
    out = llm.chat([{"role": "user", "content": "Hello there"}],
                   tinylm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.text == llm.tokenizer.decode(out.token_ids)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "SHA256SUMS"):
        assert (tmp_path / arch / name).is_file()


@pytest.mark.parametrize("arch", TRANSFORMERS_FAMILIES)
def test_transformers_loads_tiny_and_agrees(arch, tmp_path):
    if not _supported(arch):
        pytest.skip(f"{arch} is not implemented in this checkout")
    folder = make_tiny(arch, tmp_path / arch, seed=1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    llm = tinylm.load(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = llm.apply_chat_template(messages)
    assert ids == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits
    assert torch.allclose(llm.forward([ids]).logits, ref_logits, atol=1e-4)


def test_seed_decides_the_weights(tmp_path):
    a = make_tiny("llama", tmp_path / "a", seed=5)
    b = make_tiny("llama", tmp_path / "b", seed=5)
    c = make_tiny("llama", tmp_path / "c", seed=6)
    assert (a / "SHA256SUMS").read_text() == (b / "SHA256SUMS").read_text()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_unknown_family_is_one_line(tmp_path, capsys):
    assert main(["tiny", "mamba", str(tmp_path / "x")]) == 1
    assert "unknown family 'mamba'" in capsys.readouterr().err
