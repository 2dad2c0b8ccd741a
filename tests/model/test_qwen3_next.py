"""Qwen3-Next parity with transformers' Qwen3NextForCausalLM, built inside the test and shaped like seed 002's table
(fp32, strict): padded-batch logits and loss, greedy decoding with the cache, chunked prefill, both config formats."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tinylm
from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.model.cache import make_cache

VOCAB = 1024
LONG = 100  # longer than the DeltaNet chunk (64)


def seed_002_config(**overrides) -> transformers.Qwen3NextConfig:
    """Seed 002's table; linear_* heads are transformers' defaults (16 x 128 keys, 32 x 128 values) scaled down."""
    values = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=True,
        layer_types=["linear_attention", "full_attention"] * 3, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=256, shared_expert_intermediate_size=128, tie_word_embeddings=True,
        linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, initializer_range=0.1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
    )
    values.update(overrides)
    return transformers.Qwen3NextConfig(**values)


def _randomize_vectors(model) -> None:
    """Every 1-D parameter away from its neutral init, so a missing bias, a (1 + w) read as w, or a dropped
    dt_bias shows: q/k/v biases uniform +-0.2 as in the seed card, norms and the rest likewise."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith("A_log"):
                offset = 1.0 if name.endswith(("dt_bias", "linear_attn.norm.weight")) else 0.0
                param.copy_(torch.empty(param.shape).uniform_(-0.2, 0.2, generator=gen) + offset)


def build(folder, **overrides):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(seed_002_config(**overrides), dtype=torch.float32).eval()
    _randomize_vectors(hf)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
    return hf, tinylm.load(folder, dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: on the shared 2-core machine a second intra-op thread mostly waits for a busy core
    (measured 15-20x slower under load). Speed is never asserted; this only keeps the file quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("qwen3_next")
    hf, llm = build(folder)
    return hf, llm, folder


def _padded_batch():
    """Three rows of 80 tokens (over one chunk): unpadded, left-padded by 13, right-padded by 7."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 80), generator=gen)
    mask = torch.ones(3, 80, dtype=torch.long)
    mask[1, :13] = 0
    mask[2, 73:] = 0
    return ids, mask


def _compare_padded_batch(hf, llm):
    ids, mask = _padded_batch()
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


def test_config_is_the_hybrid(pair):
    _, llm, _ = pair
    config = llm.config
    assert config.model_type == "qwen3_next" and config.layer_types[:2] == ["linear_attention", "full_attention"]
    assert (config.attn_output_gate, config.zero_centered_norm, config.qk_norm, config.qkv_bias) == (True,) * 4
    assert config.partial_rotary_factor == 0.25  # Qwen3NextConfig's default, not 1.0
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert config.shared_expert_intermediate_size == 128 and config.num_experts_per_tok == 1


def test_logits_and_loss_match_transformers_on_padded_batch(pair):
    hf, llm, _ = pair
    _compare_padded_batch(hf, llm)


def test_unnormalized_top1_router_matches_too(tmp_path):
    _compare_padded_batch(*build(tmp_path, norm_topk_prob=False))  # the router weight reaches the expert output


def test_padding_does_not_change_logits_at_real_tokens(pair):
    _, llm, _ = pair
    ids, mask = _padded_batch()
    batched = llm.forward(ids, attention_mask=mask).logits
    for row in range(3):
        real = mask[row].bool()
        alone = llm.forward(ids[row][real][None]).logits[0]
        assert torch.allclose(batched[row][real], alone, atol=1e-4), (batched[row][real] - alone).abs().max()


def _hf_greedy(hf, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_with_cache_matches_transformers_generate(pair):
    hf, llm, _ = pair
    prompts = [[17], torch.randint(0, VOCAB, (LONG,), generator=torch.Generator().manual_seed(2)).tolist()]
    refs = [_hf_greedy(hf, p, 32) for p in prompts]
    params = tinylm.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    for prompt, ref in zip(prompts, refs):
        assert llm.generate([prompt], params)[0].token_ids == ref
    # Both in one left-padded batch; the short one stops early, so the cache drops its row mid-decode.
    short = tinylm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, [short, params])
    assert together[0].token_ids == refs[0][:12] and together[1].token_ids == refs[1]


def test_chunked_prefill_and_steps_equal_one_forward(pair):
    _, llm, _ = pair
    ids = torch.randint(0, VOCAB, (2, 110), generator=torch.Generator().manual_seed(3))
    model = llm.model
    with torch.no_grad():
        full = model(ids).logits
        cache = make_cache(model.config, 2, 110, torch.float32)
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 70), (70, 100), (100, 101))]
        pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(101, 110)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)


def test_4x_config_format_loads_the_same_model(pair, tmp_path):
    _, llm, folder = pair
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                  rope_scaling={"type": "yarn", "factor": rope["factor"],
                                "original_max_position_embeddings": rope["original_max_position_embeddings"]})
    _copy_with_config(folder, tmp_path, config)
    v4 = tinylm.load(tmp_path, dtype="float32")
    assert v4.config == llm.config
    ids, mask = _padded_batch()
    assert torch.equal(v4.forward(ids, mask).logits, llm.forward(ids, mask).logits)


def test_card_naming_qwen3moe_with_linear_layers_is_the_hybrid(pair, tmp_path):
    _, llm, folder = pair
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")  # as seed 002's card says
    _copy_with_config(folder, tmp_path, config)
    card = tinylm.load(tmp_path, dtype="float32")
    assert card.config == llm.config
    ids, _ = _padded_batch()
    assert torch.equal(card.forward(ids).logits, llm.forward(ids).logits)


def test_multi_token_prediction_tensors_are_skipped(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, llm, folder = pair
    tensors = load_file(folder / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(128, 256)  # the hub's Qwen3-Next checkpoints carry an MTP head
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids, _ = _padded_batch()
    assert torch.equal(tinylm.load(tmp_path).forward(ids).logits, llm.forward(ids).logits)


def _copy_with_config(src, dst, config: dict) -> None:
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (dst / "config.json").write_text(json.dumps(config))


def _small(**changes) -> dict:
    base = seed_002_config().to_dict()
    base.update(changes)
    return base


def test_missing_keys_take_transformers_defaults():
    data = _small()
    data.pop("rope_parameters")
    data.pop("layer_types")
    data.update(rope_theta=1e6, num_hidden_layers=8)
    ours = ModelConfig.from_hf_dict(data)
    theirs = transformers.Qwen3NextConfig(**data)
    assert ours.layer_types == theirs.layer_types  # from full_attention_interval = 4
    assert ours.partial_rotary_factor == theirs.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize("changes,field", [
    (dict(layer_types=["linear_attention", "full_attention"]), "layer_types"),
    (dict(layer_types=["linear_attention", "mamba"] * 3), "layer_types"),
    (dict(linear_num_value_heads=6), "linear_num_value_heads"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim"),
    (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
    (dict(full_attention_interval=0, layer_types=None), "full_attention_interval"),
    (dict(num_experts_per_tok=3), "num_experts_per_tok"),
])
def test_inconsistent_hybrid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(_small(**changes))
