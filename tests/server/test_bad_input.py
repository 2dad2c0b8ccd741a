"""Every bad input gets a clear error in the dialect's format, and the server still answers afterwards."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.server.conftest import post, running_server, wait_until_idle
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig

LONG = "word " * 9000  # beyond SmolLM2's 8192-token context

OPENAI_CASES = {
    "prompt beyond the context": ({"prompt": LONG, "max_tokens": 4}, "maximum context length is 8192"),
    "prompt + max_tokens beyond the context": ({"prompt": "Hello", "max_tokens": 8192},
                                               "you requested 8193 tokens"),
    "negative temperature": ({"prompt": "Hi", "temperature": -0.5}, "temperature must be >= 0"),
    "top_p zero": ({"prompt": "Hi", "top_p": 0}, "top_p must be in (0, 1]"),
    "top_p above one": ({"prompt": "Hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    "top_k below -1": ({"prompt": "Hi", "top_k": -2}, "top_k must be -1"),
    "n zero": ({"prompt": "Hi", "n": 0}, "n must be an integer in [1, 16]"),
    "token id outside the vocabulary": ({"prompt": [1, 2, 999999]}, "outside the vocabulary"),
    "too many stop strings": ({"prompt": "Hi", "stop": [f"s{i}" for i in range(40)]}, "at most 16 stop strings"),
    "wrong type": ({"prompt": "Hi", "max_tokens": "many"}, "max_tokens"),
    "missing prompt": ({"max_tokens": 3}, "prompt"),
    "unknown model": ({"prompt": "Hi", "model": "gpt-9"}, "does not exist"),
    "empty prompt": ({"prompt": []}, "must not be empty"),
}


def _still_answers(url: str) -> None:
    response = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("case", list(OPENAI_CASES))
def test_openai_bad_input_is_400_with_message(server, case):
    url, _ = server
    body, words = OPENAI_CASES[case]
    status = 404 if case == "unknown model" else 400
    response = post(url, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["code"] == status
    _still_answers(url)


def test_chat_bad_input(server):
    url, _ = server
    response = post(url, "/v1/chat/completions", {"messages": [], "max_tokens": 3})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
    response = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]})
    assert response.status_code == 400 and "maximum context length" in response.json()["error"]["message"]
    _still_answers(url)


@pytest.mark.parametrize("body, raw", [(None, b'{"prompt": "Hi", "max_tokens": 3'), (None, b"\xff\xfe not json")])
def test_malformed_json_is_400(server, body, raw):
    url, _ = server
    response = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    _still_answers(url)


def test_oversized_body_is_413(server):
    url, app = server
    limit = app.state.tinylm.config.max_body_bytes
    response = httpx.post(url + "/v1/completions", json={"prompt": "x" * (limit + 10)})
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]["message"]
    _still_answers(url)


TGI_CASES = {
    "temperature zero": ({"temperature": 0}, "`temperature` must be strictly positive"),
    "top_p one": ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    "top_k zero": ({"top_k": 0}, "`top_k` must be strictly positive"),
    "too many stops": ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 stop sequences"),
    "max_new_tokens zero": ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    "beyond the context": ({"max_new_tokens": 8192}, "maximum context length is 8192"),
}


@pytest.mark.parametrize("case", list(TGI_CASES))
def test_tgi_bad_input_is_422(server, case):
    url, _ = server
    parameters, words = TGI_CASES[case]
    for route in ("/generate", "/generate_stream"):
        response = post(url, route, {"inputs": "Hello there", "parameters": parameters})
        assert response.status_code == 422, response.text
        assert words in response.json()["error"] and response.json()["error_type"] == "validation"
    assert post(url, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_tgi_malformed_json_is_422(server):
    url, _ = server
    response = httpx.post(url + "/generate", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]


def test_full_queue_is_429_and_recovers(tiny_llm):
    config = ServerConfig(model_name="tiny", engine=EngineConfig(max_num_seqs=1, max_queue=1))
    with running_server(tiny_llm, config) as (url, app):
        body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: post(url, "/v1/completions", body), range(6))]
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
        wait_until_idle(app)
        too_many = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 3})  # 3 > 1 slot + 1 queued
        assert too_many.status_code == 429 and "queue is full" in too_many.json()["error"]["message"]
        assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 2}).status_code == 200
        tgi = post(url, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert tgi.status_code == 200
