"""The public API on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): generation, streaming, stops,
logprobs, batching, errors; and logits against transformers loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

import tinylm
from tinylm.errors import ContextLengthError

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return tinylm.load(smollm2_gguf, dtype="float32")


def test_logits_match_transformers_on_same_gguf(llm, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    ids = torch.tensor([llm.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ref = ref_model(ids).logits.log_softmax(-1)
    ours = llm.forward(ids).logits.log_softmax(-1)
    kl = (ref.exp() * (ref - ours)).sum(-1)  # KL(transformers || tinylm) per position
    assert kl.max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_logits_to_keep_gives_the_last_positions(llm):
    ids = [llm.encode("The capital of France is Paris. The capital of Italy is")] * 2
    full = llm.forward(ids).logits
    last = llm.forward(ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -3:], rtol=1e-4, atol=1e-4)  # another GEMM shape: fp32 rounding
    with pytest.raises(ValueError, match="logits_to_keep"):
        llm.forward(ids, labels=ids, logits_to_keep=1)


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   tinylm.SamplingParams(max_tokens=24, **GREEDY))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_several_prompts_at_once_equal_one_at_a_time(llm):
    prompts = ["Once upon a time", "The three primary colors are red, yellow and", [1, 504, 3458]]
    params = tinylm.SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = llm.generate(prompt, params)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_stream_deltas_concatenate_to_the_text_and_never_split_utf8(llm):
    prompt = "Emoji and accents: 😀 café, naïve, 東京. Repeat them: 😀"
    params = tinylm.SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    events = list(llm.stream(prompt, params))
    assert all("\ufffd" not in e.text for e in events)
    full = llm.generate(prompt, params)[0]
    assert "".join(e.text for e in events) == full.text
    assert full.text == llm.tokenizer.decode(full.token_ids)


def test_stop_string_cuts_the_output(llm):
    params = tinylm.SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    free = llm.generate("Count: one, two, three,", params)[0].text
    stop = free.strip().split()[2]  # a word the model will produce
    stopped = llm.generate("Count: one, two, three,", tinylm.SamplingParams(
        max_tokens=24, ignore_eos=True, stop=[stop], **GREEDY))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]
    streamed = "".join(e.text for e in llm.stream("Count: one, two, three,", tinylm.SamplingParams(
        max_tokens=24, ignore_eos=True, stop=[stop], **GREEDY)))
    assert streamed == stopped.text


def test_eos_ends_generation_and_stop_token_ids_too(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], tinylm.SamplingParams(max_tokens=64, **GREEDY))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.eos_token_ids
    first = out.token_ids[0]
    cut = llm.chat([{"role": "user", "content": "Say hi."}],
                   tinylm.SamplingParams(max_tokens=64, stop_token_ids=[first], **GREEDY))[0]
    assert cut.token_ids == [first] and cut.finish_reason == "stop"


def test_logprobs_equal_teacher_forced_forward(llm):
    prompt = llm.encode("The quick brown fox")
    out = llm.generate([prompt], tinylm.SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True, **GREEDY))[0]
    logits = llm.forward([prompt + out.token_ids]).logits[0].float().log_softmax(-1)
    for step, entry in enumerate(out.logprobs):
        row = logits[len(prompt) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))


def test_seeded_sampling_is_reproducible(llm):
    params = tinylm.SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    first = llm.generate("Write a story:", params)[0]
    again = llm.generate(["Hello", "Write a story:"], params)[1]
    assert first.token_ids == again.token_ids
    other = llm.generate("Write a story:", tinylm.SamplingParams(max_tokens=16, temperature=1.0, seed=124,
                                                               ignore_eos=True))[0]
    assert other.token_ids != first.token_ids


def test_over_long_input_names_both_numbers(llm):
    limit = llm.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"{limit + 1}.*{limit}"):
        llm.forward(torch.zeros(1, limit + 1, dtype=torch.long))
    with pytest.raises(ContextLengthError, match=f"{limit}"):
        llm.generate([[1] * limit], tinylm.SamplingParams(max_tokens=4))


def test_out_of_vocabulary_prompt_ids(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, llm.config.vocab_size + 5]], tinylm.SamplingParams(max_tokens=2))


def test_tiny_temperature_is_raised_instead_of_overflowing(llm):
    """logits / 1e-45 overflowed to inf and NaN (six end-of-text tokens, empty text); it is raised to 0.01."""
    prompt = "The capital of France is"
    reference = llm.generate(prompt, tinylm.SamplingParams(max_tokens=6, temperature=0.01, seed=0))[0]
    for temperature in (1e-45, 1e-6):
        with pytest.warns(UserWarning):
            params = tinylm.SamplingParams(max_tokens=6, temperature=temperature, seed=0)
        tiny = llm.generate(prompt, params)[0]
        assert tiny.token_ids == reference.token_ids and tiny.text.strip()