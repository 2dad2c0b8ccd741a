"""A server whose model has a draft (speculative decoding): the same greedy text, streamed token by token, and
the draft counters on /metrics."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import tinylm
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig

from tests.server.conftest import post, running_server


def test_served_with_a_draft(tiny_folder):
    target = tiny_folder("llama", 4)
    llm = tinylm.load(target, draft=target, draft_quantize="int8", num_speculative_tokens=4)
    alone = tinylm.load(target)
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12}}
    expected = alone.generate("Once upon a time", tinylm.SamplingParams(max_tokens=12, temperature=0))[0].text
    config = ServerConfig(model_name="tiny", engine=EngineConfig(num_speculative_tokens=4))
    with running_server(llm, config) as (url, _):
        assert post(url, "/generate", body).json()["generated_text"] == expected
        events = [json.loads(line[5:]) for line in post(url, "/generate_stream", body).text.splitlines()
                  if line.startswith("data:")]
        assert len(events) == len([e for e in events if e["token"]["special"] is False]) <= 12
        assert events[-1]["generated_text"] == expected == "".join(e["token"]["text"] for e in events)
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in httpx.get(url + "/metrics").text.splitlines()
                  if line and not line.startswith("#")}
    assert values["tinylm:spec_decode_num_draft_tokens"] > 0
    assert values["tinylm:spec_decode_num_accepted_tokens"] > 0
    assert values["tinylm:spec_decode_num_accepted_tokens"] <= values["tinylm:spec_decode_num_draft_tokens"]


def test_concurrent_mixed_requests_with_a_draft(tiny_folder):
    """Greedy, seeded sampling, penalties and stop strings at once: some speculate, some not, batches join and
    leave; every answer is whole and the greedy ones are the model's own."""
    target = tiny_folder("llama", 4)
    llm = tinylm.load(target, draft="[ngram]", num_speculative_tokens=3)
    alone = tinylm.load(target)
    prompts = ["Once upon a time", "The capital of France is Paris. " * 3, "def add(a, b):", "Hi there"]
    expected = [o.text for o in alone.generate(prompts, tinylm.SamplingParams(max_tokens=10, temperature=0))]
    bodies = [{"inputs": p, "parameters": {"max_new_tokens": 10}} for p in prompts]
    bodies += [{"inputs": prompts[1], "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 3}},
               {"inputs": prompts[0], "parameters": {"max_new_tokens": 10, "repetition_penalty": 1.3}},
               {"inputs": prompts[1], "parameters": {"max_new_tokens": 10, "stop": ["Paris"]}}]
    with running_server(llm, ServerConfig(model_name="tiny")) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: post(url, "/generate", body), bodies))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["generated_text"] for r in responses[:4]] == expected
