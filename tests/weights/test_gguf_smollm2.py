"""GGUF reading on the real SmolLM2-135M-Instruct Q4_1 file: config, tokenizer, chat template and state dict against
transformers' GGUF loader, and conversion to a Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch

from tinylm.weights.convert import convert_gguf_to_hf
from tinylm.weights.gguf import load_gguf


# --- the real model: SmolLM2-135M-Instruct Q4_1 against transformers' GGUF loader


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


TEXTS = ["Hello world!", "12345", "3.14159 and 1,000,000", "def f(x):\n    return x**2  # squared\n",
         "Café déjà vu, naïve façade", "emoji 🚀🦙 ok", "  leading spaces", "tab\tnew\n\nline",
         "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|><repo_name>x"]
# Spaces before a digit: SmolLM2's tokenizer.json splits digits out first (Digits(individual_digits=True)), so the
# spaces form their own piece ("  " -> "ĠĠ"); transformers' GGUF converter drops that pre-tokenizer and gives
# "Ġ", "Ġ1" -> two "Ġ" tokens.
SPACES_THEN_DIGITS = ["x  12", "    1 + 2", "total:   42"]
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"}]


def test_smollm2_config(smol):
    c = smol.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.max_position_embeddings, c.rope_theta, c.rope_scaling, c.partial_rotary_factor) == (8192, 1e5, None, 1)
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.tie_word_embeddings and not (c.qkv_bias or c.qk_norm)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, [2], 2)
    assert "lm_head.weight" not in smol.tensors and smol.metadata["tokenizer.ggml.pre"] == "smollm"
    assert not any(len(v) > 64 for v in smol.metadata.values() if isinstance(v, list))


def test_smollm2_tokenizer_matches_transformers(smol, hf_tokenizer):
    import tokenizers

    ours = smol.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == hf_tokenizer.encode(text), text
    # transformers' backend with SmolLM2's own pre-tokenizer put back is the reference where the two differ
    fixed = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    fixed.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + SPACES_THEN_DIGITS:
        assert ours.encode(text) == fixed.encode(text).ids, text
    assert ours.encode("x  12") == [ours.token_to_id(t) for t in ("x", "ĠĠ", "1", "2")]
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.eos_token_ids == {2}


def test_smollm2_chat_template_matches_transformers(smol, hf_tokenizer):
    for prompt in (True, False):
        ref = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        assert smol.tokenizer.apply_chat_template(CHAT, add_generation_prompt=prompt) == ref
    assert smol.tokenizer.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")


def test_smollm2_state_dict_matches_transformers(smol, hf_model):
    ref = hf_model.state_dict()
    assert set(ref) - set(smol.tensors) == {"lm_head.weight"} and set(smol.tensors) <= set(ref)
    assert torch.equal(ref["lm_head.weight"], smol.tensors["model.embed_tokens.weight"])
    for name, tensor in smol.tensors.items():
        assert torch.equal(tensor, ref[name]), name


def test_convert_smollm2(tmp_path, smollm2_gguf, smol, hf_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.weights.safetensors_io import verify_manifest

    dest = convert_gguf_to_hf(smollm2_gguf, tmp_path / "hf")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(dest).eval(), AutoTokenizer.from_pretrained(dest)
    ids = smol.tokenizer.encode("The capital of France is")
    assert tokenizer.encode("The capital of France is") == ids
    assert [tokenizer.encode(t) for t in SPACES_THEN_DIGITS] == [smol.tokenizer.encode(t) for t in SPACES_THEN_DIGITS]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, hf_model(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=0)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        smol.tokenizer.apply_chat_template(CHAT)
    listed = {line.split("  ", 1)[1] for line in (dest / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in dest.iterdir()} - {"SHA256SUMS"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= listed
    verify_manifest(dest)
    assert json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == 2
