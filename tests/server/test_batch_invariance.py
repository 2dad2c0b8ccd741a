"""Batch invariance through HTTP (issue 21): the same 16 completion requests sent one after another and by 16
concurrent clients give identical JSON (text, tokens' logprobs and top alternatives), with the built-in model in
bfloat16, where the library products would make the concurrent answers differ."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import tinylm
from tests.server.conftest import post, running_server
from tinylm import hub, kernels
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ toolchain to build tinylm's kernels")

TOPICS = ["the sea", "a robot", "Paris", "mathematics", "a cat", "winter", "coffee", "the moon", "trains", "music",
          "a garden", "history", "rain", "chess", "bread", "the stars"]


def _body(topic: str) -> dict:
    return {"model": "smollm2", "prompt": f"Here is one sentence about {topic}:", "max_tokens": 12,
            "temperature": 0, "logprobs": 2}


def test_sequential_and_concurrent_clients_get_identical_logprobs():
    llm = tinylm.load(hub.resolve(hub.DEFAULT_MODEL), dtype="bfloat16")
    config = ServerConfig(model_name="smollm2", engine=EngineConfig(max_num_seqs=16, kv_cache_bytes=256 << 20))
    with running_server(llm, config) as (url, _):
        def ask(topic: str) -> dict:
            response = post(url, "/v1/completions", _body(topic))
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return {"text": choice["text"], "logprobs": choice["logprobs"]}

        sequential = [ask(topic) for topic in TOPICS]
        with ThreadPoolExecutor(len(TOPICS)) as pool:
            concurrent = list(pool.map(ask, TOPICS))
    assert len({answer["text"] for answer in sequential}) > 1
    assert all(answer["logprobs"]["token_logprobs"] for answer in sequential)
    assert concurrent == sequential
