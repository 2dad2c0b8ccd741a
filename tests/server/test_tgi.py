"""The TGI routes over raw HTTP, plus /health and /metrics (default model)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import post


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def test_generate_with_details(server, default_llm):
    url, _ = server
    body = {"inputs": "The capital of France is",
            "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True}}
    out = post(url, "/generate", body).json()
    assert "Paris" in out["generated_text"]
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 6
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"]
    prompt = default_llm.encode("The capital of France is")
    assert [t["id"] for t in details["prefill"]] == prompt and details["prefill"][0]["logprob"] is None
    expected = default_llm.forward([prompt]).logits[0, -1].log_softmax(-1).max().item()
    assert details["tokens"][0]["logprob"] == pytest.approx(expected, abs=1e-3)


def test_generate_stream_events(server):
    url, _ = server
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, "details": True}}
    whole = post(url, "/generate", body).json()["generated_text"]
    events = _events(post(url, "/generate_stream", body))
    assert len(events) == 5 and all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 5, "seed": None,
                                     "input_length": 5}


def test_stop_sequence_and_eos_are_told_apart(server):
    url, _ = server
    greedy = post(url, "/generate", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}})
    stop = greedy.json()["generated_text"][3:6]
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "stop": [stop], "details": True}}
    out = post(url, "/generate", body).json()
    assert out["details"]["finish_reason"] == "stop_sequence" and stop not in out["generated_text"]
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    out = post(url, "/generate", {"inputs": chat, "parameters": {"max_new_tokens": 40, "details": True}}).json()
    assert out["details"]["finish_reason"] == "eos_token"


def test_sampling_is_seeded(server):
    url, _ = server
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 5,
                                                          "details": True}}
    first, second = post(url, "/generate", body).json(), post(url, "/generate", body).json()
    assert first["generated_text"] == second["generated_text"] and first["details"]["seed"] == 5


def test_info_and_health(server, default_llm):
    url, _ = server
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == "smollm2" and info["max_total_tokens"] == default_llm.config.max_position_embeddings
    assert info["model_dtype"] == "float32" and info["max_stop_sequences"] == 4
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_count_requests_and_tokens(server):
    url, _ = server
    post(url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    text = httpx.get(url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['tinylm:requests_total{route="/generate",status="200"}'] >= 1
    assert values["tinylm:generation_tokens_total"] >= 3
    assert values["tinylm:time_to_first_token_seconds_count"] >= 1
    assert values["tinylm:inter_token_latency_seconds_count"] >= 2
    for gauge in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert f"tinylm:{gauge}" in values
    assert values["tinylm:compile_in_progress"] == 0  # nothing builds in the background here
