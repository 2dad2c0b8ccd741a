"""Parity with Hugging Face transformers on tiny random models built inside each test (fp32, strict)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tinylm
from tinylm.config import ModelConfig

VOCAB = 256


def _common(**overrides) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, rms_norm_eps=1e-6)
    base.update(overrides)
    return base


FAMILIES = {
    "llama_gqa_untied": lambda: transformers.LlamaConfig(**_common(tie_word_embeddings=False)),
    "llama_llama3_rope": lambda: transformers.LlamaConfig(**_common(
        tie_word_embeddings=False, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_bias_tied": lambda: transformers.Qwen2Config(**_common(tie_word_embeddings=True)),
    "qwen3_qknorm_head_dim": lambda: transformers.Qwen3Config(**_common(head_dim=24, tie_word_embeddings=False)),
    "qwen3_moe_top2": lambda: transformers.Qwen3MoeConfig(**_common(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True,
        head_dim=16, tie_word_embeddings=False)),
}


def _build(name: str, tmp_path, **save_kwargs):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[name](), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path, **save_kwargs)
    return hf, tinylm.load(tmp_path, dtype="float32")


def _padded_batch():
    """Three rows: unpadded, left-padded, right-padded (B=3, T=12)."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_loss_match_transformers_on_padded_batch(name, tmp_path):
    hf, llm = _build(name, tmp_path)
    ids, mask = _padded_batch()
    # A real token predicted from a padding position has no meaning (and no reference value): ignore those too.
    after_pad = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask[:, :-1] == 0], dim=1)
    labels = ids.masked_fill((mask == 0) | after_pad, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), labels=labels)
    out = llm.forward(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert torch.allclose(out.logits[real], ref.logits[real], atol=1e-4, rtol=0), \
        (out.logits[real] - ref.logits[real]).abs().max()
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_sequences_match_transformers_and_stay_apart(name, tmp_path):
    """Rows holding several sequences (positions restart at 0, SFT packing): transformers' packed-sequence mask,
    and each sequence's logits as if it ran alone."""
    hf, llm = _build(name, tmp_path)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 12))
    positions = torch.tensor([list(range(5)) + list(range(4)) + list(range(3)), list(range(12))])
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
    out = llm.forward(ids, position_ids=positions).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    alone = llm.forward(ids[:1, 5:9]).logits  # the second sequence of row 0, by itself
    assert torch.allclose(out[0, 5:9], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padding_does_not_change_logits_at_real_tokens(name, tmp_path):
    _, llm = _build(name, tmp_path)
    ids, mask = _padded_batch()
    batched = llm.forward(ids, attention_mask=mask).logits
    for row in range(3):
        real = mask[row].bool()
        alone = llm.forward(ids[row][real][None]).logits[0]
        assert torch.allclose(batched[row][real], alone, atol=1e-4), (batched[row][real] - alone).abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_with_cache_matches_transformers_generate(name, tmp_path):
    hf, llm = _build(name, tmp_path)
    prompts = [[5, 17, 42, 99, 3, 7, 250], [11, 12, 13]]
    params = tinylm.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = llm.generate(prompts, params)
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        assert out.finish_reason == "length"


def test_qwen2_both_config_formats_load_the_same_model(tmp_path):
    hf, llm_v5 = _build("qwen2_bias_tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]  # transformers 4.x layout: theta at top level, no rope_parameters
    config["rope_scaling"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm_v4 = tinylm.load(tmp_path, dtype="float32")
    assert llm_v4.config == llm_v5.config
    ids, mask = _padded_batch()
    assert torch.equal(llm_v4.forward(ids, mask).logits, llm_v5.forward(ids, mask).logits)


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf, single = _build("qwen3_qknorm_head_dim", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = tinylm.load(tmp_path / "sharded", dtype="float32")
    ids, _ = _padded_batch()
    assert torch.equal(sharded.forward(ids).logits, single.forward(ids).logits)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.3},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_rope_scaling_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tinylm.model.rotary import inverse_frequencies

    hf_config = transformers.LlamaConfig(**_common(rope_parameters={"rope_theta": 5000.0, **rope}))
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu", seq_len=300)
    ours = ModelConfig.from_hf_dict(hf_config.to_dict())
    freq, scale = inverse_frequencies(ours, seq_len=300)
    assert torch.allclose(freq, ref_freq, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_rope_scaling_in_4x_format_normalizes_like_5x():
    v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "max_position_embeddings": 128, "rope_theta": 500000.0,
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    v5 = dict(v4, rope_scaling=None, rope_theta=None,
              rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                               "original_max_position_embeddings": 32})
    assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5)
    assert ModelConfig.from_hf_dict(v4).rope_scaling["rope_type"] == "yarn"
