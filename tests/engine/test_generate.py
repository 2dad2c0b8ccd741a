"""LLM.generate on a tiny random model (no tokenizer): context limits and batch bookkeeping."""

from __future__ import annotations

import pytest
import torch
import transformers

import tinylm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.3)
    folder = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return tinylm.load(folder)


def test_max_tokens_is_clamped_to_the_context(tiny):
    out = tiny.generate([[1] * 29], tinylm.SamplingParams(max_tokens=50, ignore_eos=True, temperature=0))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert out.text == ""  # no tokenizer: ids only


def test_prompt_filling_the_context_is_refused(tiny):
    with pytest.raises(tinylm.ContextLengthError, match="32 tokens; the model's context is 32"):
        tiny.generate([[1] * 32], tinylm.SamplingParams(max_tokens=1))


def test_rows_finishing_early_leave_the_others_unchanged(tiny):
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    short = tinylm.SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    long = tinylm.SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    mixed = tiny.generate(prompts, [short, long])
    assert len(mixed[0].token_ids) == 2
    assert mixed[1].token_ids == tiny.generate([prompts[1]], long)[0].token_ids
    assert mixed[0].token_ids == tiny.generate([prompts[0]], long)[0].token_ids[:2]


def test_mismatched_params_list_is_refused(tiny):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        tiny.generate([[1, 2]], [tinylm.SamplingParams(), tinylm.SamplingParams()])
