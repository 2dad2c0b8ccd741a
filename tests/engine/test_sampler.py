"""Sampler functions against hand computations; SamplingParams validation."""

from __future__ import annotations

import math

import pytest
import torch

from tinylm.engine import sampler
from tinylm.sampling_params import SamplingParams


def _logits(probs):
    return torch.tensor([probs]).log()


def _draws(logits, params, n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [sampler.sample(logits, [params], [generator]).item() for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert sampler.sample(logits, params, [None, None]).tolist() == [1, 0]


@pytest.mark.parametrize("vocab", [49152, 5000, 2100])
def test_blocked_argmax_is_torch_argmax_ties_included(vocab):
    torch.manual_seed(0)
    logits = torch.randn(6, vocab)
    logits[1, 7] = logits[1, vocab - 3] = 50.0  # a tie across the partial last block: the first one wins
    logits[2, 1030] = logits[2, 2000] = 50.0  # a tie across whole blocks
    logits[3, vocab - 1] = 60.0  # the maximum in the last, partial block
    logits[4] = 0.0  # all equal: index 0
    assert torch.equal(sampler.argmax(logits), logits.argmax(dim=-1))


def test_top_k_one_is_argmax_at_any_temperature():
    logits = _logits([0.2, 0.5, 0.3])
    assert set(_draws(logits, SamplingParams(temperature=5.0, top_k=1))) == {1}


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = _logits([0.5, 0.3, 0.2])
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.6))) == {0, 1}
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.5))) == {0}


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = _logits([0.5, 0.3, 0.2])
    assert set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.5))) == {0, 1}


def test_sampling_follows_the_distribution():
    probs = [0.6, 0.3, 0.1]
    draws = _draws(_logits(probs), SamplingParams(temperature=1.0), n=3000)
    for token, p in enumerate(probs):
        freq = draws.count(token) / len(draws)
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / len(draws))


def test_temperature_sharpens():
    probs = [0.6, 0.4]
    cold = _draws(_logits(probs), SamplingParams(temperature=0.25), n=1000)
    # softmax(log p / 0.25) puts 0.6^4 / (0.6^4 + 0.4^4) = 0.835 on token 0
    assert abs(cold.count(0) / 1000 - 0.835) < 0.05


def test_seeded_rows_are_reproducible_whatever_shares_the_batch():
    logits = torch.zeros(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [sampler.sample(logits, [seeded], [sampler.make_generator(7, "cpu")]).item()]
    pair_gen = [sampler.make_generator(7, "cpu"), sampler.make_generator(None, "cpu")]
    together = sampler.sample(logits.repeat(2, 1), [seeded, SamplingParams(temperature=1.0)], pair_gen)
    assert together[0].item() == alone[0]


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    prompt_mask = torch.tensor([[True, False, False, False]])
    counts = torch.tensor([[0, 2, 1, 0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    out = sampler.apply_penalties(logits, params, prompt_mask, counts)
    expected = [2.0 / 2, -1.0 * 2 - 0.5 - 0.5, 0.5 / 2 - 0.5 - 0.25, 1.0]
    assert torch.allclose(out, torch.tensor([expected]))


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    chosen, values, ids = sampler.top_logprobs(logits, torch.tensor([2]), 2)
    ref = logits.log_softmax(-1)
    assert chosen.item() == pytest.approx(ref[0, 2].item())
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(values, ref[0, [1, 2]][None])


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stop": ["x"] * 17}, "stop strings"),
    ({"logprobs": 21}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_sampling_params_name_the_field(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)
