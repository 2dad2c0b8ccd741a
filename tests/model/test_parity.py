"""Parity with Hugging Face transformers on tiny random models built inside each test (fp32, strict). Every family
in FAMILIES gets the same checks: logits and loss on a padded batch, packed sequences, padding that changes nothing,
greedy generation with the cache. What only one family's design needs (Qwen3-Next's DeltaNet state, chunked vs
recurrent) is in that family's own file, tests/model/test_qwen3_next.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers

import tinylm
from tinylm.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256


def _common(**overrides) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, rms_norm_eps=1e-6)
    base.update(overrides)
    return base


def seed_002_config(**overrides) -> transformers.Qwen3NextConfig:
    """Qwen3-Next shaped like seed 002's table; linear_* heads are transformers' defaults (16 x 128 keys,
    32 x 128 values) scaled down."""
    values = dict(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=True,
        layer_types=["linear_attention", "full_attention"] * 3, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=256, shared_expert_intermediate_size=128, tie_word_embeddings=True,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
    )
    values.update(overrides)
    return transformers.Qwen3NextConfig(**values)


def randomize_vectors(model) -> None:
    """Every 1-D parameter away from its neutral init, so a missing bias, a (1 + w) read as w, or a dropped
    dt_bias shows: q/k/v biases uniform +-0.2 as in the seed card, norms and the rest likewise."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith("A_log"):
                offset = 1.0 if name.endswith(("dt_bias", "linear_attn.norm.weight")) else 0.0
                param.copy_(torch.empty(param.shape).uniform_(-0.2, 0.2, generator=gen) + offset)


@dataclass(frozen=True)
class Family:
    """A row of the table: the transformers config, and the inputs the checks give it."""
    config: Callable[..., transformers.PretrainedConfig]  # keyword overrides -> config
    vocab: int = VOCAB
    length: int = 12  # the padded batch: 3 rows of `length` tokens; row 1 left-padded, row 2 right-padded
    left_pad: int = 4
    right_pad: int = 3
    prompts: tuple[tuple[int, ...], ...] = ((5, 17, 42, 99, 3, 7, 250), (11, 12, 13))  # greedy generation
    prepare: Callable[[torch.nn.Module], None] | None = None  # on the transformers model, before it is saved


FAMILIES = {
    "llama_gqa_untied": Family(lambda **o: transformers.LlamaConfig(**_common(tie_word_embeddings=False, **o))),
    "llama_llama3_rope": Family(lambda **o: transformers.LlamaConfig(**_common(
        tie_word_embeddings=False, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **o))),
    "qwen2_bias_tied": Family(lambda **o: transformers.Qwen2Config(**_common(tie_word_embeddings=True, **o))),
    "qwen3_qknorm_head_dim": Family(lambda **o: transformers.Qwen3Config(**_common(
        head_dim=24, tie_word_embeddings=False, **o))),
    "qwen3_moe_top2": Family(lambda **o: transformers.Qwen3MoeConfig(**_common(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True,
        head_dim=16, tie_word_embeddings=False, **o))),
    # The hybrid: inputs longer than one DeltaNet chunk (64 tokens), a prompt of 1 token and one of 100.
    "qwen3_next": Family(
        seed_002_config, vocab=1024, length=80, left_pad=13, right_pad=7, prepare=randomize_vectors,
        prompts=((17,), tuple(torch.randint(0, 1024, (100,), generator=torch.Generator().manual_seed(2)).tolist()))),
}


def build(name: str, folder, **overrides):
    """(transformers model, tinylm LLM) of FAMILIES[name] (config fields changed by `overrides`), saved in folder."""
    family = FAMILIES[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(family.config(**overrides), dtype=torch.float32).eval()
    if family.prepare:
        family.prepare(hf)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
    return hf, tinylm.load(folder, dtype="float32")


def padded_batch(name: str):
    """Three rows: unpadded, left-padded, right-padded."""
    family = FAMILIES[name]
    ids = torch.randint(0, family.vocab, (3, family.length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, family.length, dtype=torch.long)
    mask[1, :family.left_pad] = 0
    mask[2, family.length - family.right_pad:] = 0
    return ids, mask


def compare_padded_batch(name: str, hf, llm) -> None:
    """Logits at real tokens and the loss equal transformers' on padded_batch(name)."""
    ids, mask = padded_batch(name)
    # A real token predicted from a padding position has no meaning (and no reference value): ignore those too.
    after_pad = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask[:, :-1] == 0], dim=1)
    labels = ids.masked_fill((mask == 0) | after_pad, -100)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    out = llm.forward(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert torch.allclose(out.logits[real], ref.logits[real], atol=1e-4, rtol=0), \
        (out.logits[real] - ref.logits[real]).abs().max()
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)


def hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def copy_with_config(src, dst, config: dict) -> None:
    """src's model.safetensors next to another config.json, in dst."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_loss_match_transformers_on_padded_batch(name, tmp_path):
    compare_padded_batch(name, *build(name, tmp_path))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_sequences_match_transformers_and_stay_apart(name, tmp_path):
    """Rows holding several sequences (positions restart at 0, SFT packing): transformers' packed-sequence mask,
    and each sequence's logits as if it ran alone."""
    hf, llm = build(name, tmp_path)
    ids = torch.randint(0, FAMILIES[name].vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([list(range(5)) + list(range(4)) + list(range(3)), list(range(12))])
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions, use_cache=False).logits
    out = llm.forward(ids, position_ids=positions).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=0), (out - ref).abs().max()
    alone = llm.forward(ids[:1, 5:9]).logits  # the second sequence of row 0, by itself
    apart = torch.allclose(out[0, 5:9], alone[0], atol=1e-4, rtol=0)
    if not apart and "linear_attention" in (llm.config.layer_types or ()):
        pytest.xfail("DeltaNet's state runs on across packed sequences (transformers' does too, as checked above)")
    assert apart, (out[0, 5:9] - alone[0]).abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padding_does_not_change_logits_at_real_tokens(name, tmp_path):
    _, llm = build(name, tmp_path)
    ids, mask = padded_batch(name)
    batched = llm.forward(ids, attention_mask=mask).logits
    for row in range(3):
        real = mask[row].bool()
        alone = llm.forward(ids[row][real][None]).logits[0]
        assert torch.allclose(batched[row][real], alone, atol=1e-4), (batched[row][real] - alone).abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_with_cache_matches_transformers_generate(name, tmp_path):
    hf, llm = build(name, tmp_path)
    prompts = [list(p) for p in FAMILIES[name].prompts]
    refs = [hf_greedy(hf, p, 32) for p in prompts]
    params = tinylm.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for out, ref in zip(llm.generate(prompts, params), refs):  # in one batch
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    for prompt, ref in zip(prompts, refs):  # one at a time
        assert llm.generate([prompt], params)[0].token_ids == ref
    # In one batch where the first stops early, so the cache drops its row mid-decode.
    short = tinylm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, [short, params])
    assert together[0].token_ids == refs[0][:12] and together[1].token_ids == refs[1]


def _to_4x(config: dict) -> dict:
    """A transformers 5 config.json in the 4.x layout: rope_theta (and partial_rotary_factor) at the top level,
    rope_scaling {"type": ...} (None for plain RoPE) instead of rope_parameters."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    return config


@pytest.mark.parametrize("name", ["qwen2_bias_tied", "qwen3_next"])
def test_both_config_formats_load_the_same_model(name, tmp_path):
    _, llm_v5 = build(name, tmp_path / "v5")
    config = json.loads((tmp_path / "v5" / "config.json").read_text())
    copy_with_config(tmp_path / "v5", tmp_path / "v4", _to_4x(config))
    llm_v4 = tinylm.load(tmp_path / "v4", dtype="float32")
    assert llm_v4.config == llm_v5.config
    ids, mask = padded_batch(name)
    assert torch.equal(llm_v4.forward(ids, mask).logits, llm_v5.forward(ids, mask).logits)


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf, single = build("qwen3_qknorm_head_dim", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = tinylm.load(tmp_path / "sharded", dtype="float32")
    ids, _ = padded_batch("qwen3_qknorm_head_dim")
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
