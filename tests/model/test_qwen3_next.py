"""Qwen3-Next against transformers' Qwen3NextForCausalLM, beyond the checks every family gets in
tests/model/test_parity.py (where "qwen3_next" is a row of the table, shaped like seed 002's): the config is the
hybrid, the unnormalized top-1 router, chunked prefill and single steps equal one forward, the checkpoint's other
namings, and config errors that name the field (fp32, strict)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tinylm
from tests.model.test_parity import (FAMILIES, build, compare_padded_batch, copy_with_config, padded_batch,
                                     seed_002_config)
from tinylm.config import ModelConfig
from tinylm.errors import ConfigError
from tinylm.model.cache import make_cache

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = FAMILIES["qwen3_next"].vocab


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("qwen3_next")
    hf, llm = build("qwen3_next", folder)
    return hf, llm, folder


def test_config_is_the_hybrid(pair):
    _, llm, _ = pair
    config = llm.config
    assert config.model_type == "qwen3_next" and config.layer_types[:2] == ["linear_attention", "full_attention"]
    assert (config.attn_output_gate, config.zero_centered_norm, config.qk_norm, config.qkv_bias) == (True,) * 4
    assert config.partial_rotary_factor == 0.25  # Qwen3NextConfig's default, not 1.0
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert config.shared_expert_intermediate_size == 128 and config.num_experts_per_tok == 1


def test_unnormalized_top1_router_matches_too(tmp_path):
    # the router weight reaches the expert output
    compare_padded_batch("qwen3_next", *build("qwen3_next", tmp_path, norm_topk_prob=False))


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


def test_card_naming_qwen3moe_with_linear_layers_is_the_hybrid(pair, tmp_path):
    _, llm, folder = pair
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")  # as seed 002's card says
    copy_with_config(folder, tmp_path, config)
    card = tinylm.load(tmp_path, dtype="float32")
    assert card.config == llm.config
    ids, _ = padded_batch("qwen3_next")
    assert torch.equal(card.forward(ids).logits, llm.forward(ids).logits)


def test_multi_token_prediction_tensors_are_skipped(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, llm, folder = pair
    tensors = load_file(folder / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(128, 256)  # the hub's Qwen3-Next checkpoints carry an MTP head
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids, _ = padded_batch("qwen3_next")
    assert torch.equal(tinylm.load(tmp_path).forward(ids).logits, llm.forward(ids).logits)


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
