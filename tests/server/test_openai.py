"""The OpenAI routes, driven by the official `openai` Python client against a running server (default model)."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.server.conftest import post


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client, default_llm):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]


def test_completion_answers(client):
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert "Paris" in choice.text and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == 5


def test_chat_answers_paris(client):
    out = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_the_whole_one(client):
    args = dict(model="smollm2", prompt="Once upon a time", max_tokens=24, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_streamed_chat_equals_the_whole_one(client):
    args = dict(model="smollm2", messages=[{"role": "user", "content": "Write a haiku about the sea."}],
                max_tokens=32, temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_completion_logprobs_are_the_model_distribution(client, default_llm):
    prompt = default_llm.encode("The capital of France is")
    out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=3, temperature=0, logprobs=5)
    logprobs = out.choices[0].logprobs
    generated = default_llm.encode(out.choices[0].text)
    full = default_llm.forward([prompt + generated]).logits[0].log_softmax(-1)
    for step, value in enumerate(logprobs.token_logprobs):
        assert value == pytest.approx(full[len(prompt) - 1 + step].max().item(), abs=1e-3)  # greedy: the top one
        assert len(logprobs.top_logprobs[step]) >= 5 and max(logprobs.top_logprobs[step].values()) == value


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_lm_eval_loglikelihood_request_matches_forward(server, default_llm):
    """lm-evaluation-harness' local-completions scoring: echo=True, max_tokens=1, logprobs=1, token ids in."""
    url, _ = server
    context = default_llm.encode("Question: What is the capital of France?\nAnswer:")
    continuation = default_llm.encode(" Paris is the capital")
    body = {"model": "smollm2", "prompt": [context + continuation], "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == len(context) + len(continuation) + 1 and token_logprobs[0] is None
    served = sum(token_logprobs[len(context):-1])  # lm-eval's slice: the continuation, not the generated token
    logits = default_llm.forward([context + continuation]).logits[0].log_softmax(-1)
    targets = torch.tensor(continuation)
    expected = logits[len(context) - 1:-1].gather(-1, targets[:, None]).sum().item()
    assert served == pytest.approx(expected, abs=1e-3)


def test_scoring_only_with_max_tokens_zero(server):
    url, _ = server
    body = {"model": "smollm2", "prompt": "Paris is the capital of France", "max_tokens": 0, "echo": True,
            "logprobs": 0}
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    assert choice["text"] == "Paris is the capital of France"
    assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) == 6


def test_n_choices_and_seeds(client):
    args = dict(model="smollm2", prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=3)
    first = [c.text for c in client.completions.create(**args, n=3).choices]
    again = [c.text for c in client.completions.create(**args, n=3).choices]
    assert first == again and len(set(first)) > 1  # reproducible, and the choices differ


def test_tokenize_and_detokenize(server, default_llm):
    url, _ = server
    tokens = post(url, "/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["tokens"] == default_llm.encode("Hello world") and tokens["count"] == len(tokens["tokens"])
    assert post(url, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "Hello world"


def test_streamed_chunks_never_split_a_character(client):
    """Multi-byte characters (emoji, CJK, accents) come out whole in every chunk, and the chunks add up."""
    args = dict(model="smollm2", max_tokens=48, temperature=0,
                messages=[{"role": "user", "content": "Write three emoji and the Japanese word for cat (猫)."}])
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)]
    assert any(ord(ch) > 0x7F for ch in whole), whole  # the answer does hold multi-byte characters
    assert "".join(chunks) == whole and not any("\ufffd" in chunk for chunk in chunks)
