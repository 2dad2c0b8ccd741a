"""LoRA adapters through the server: --lora-modules names are models on every route and in /v1/models, requests
for two adapters and the base model run together and each equals the merged model; adapters load and unload while
serving, behind --allow-runtime-lora."""

from __future__ import annotations

import concurrent.futures

import pytest

import tinylm
from tests.lora_helpers import make_adapter
from tests.server.conftest import post, running_server
from tinylm.server.app import ServerConfig

GREEDY = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(tiny_folder, tmp_path_factory):
    base = tiny_folder("llama", 2)
    root = tmp_path_factory.mktemp("adapters")
    folders = {"a1": make_adapter(base, root / "a1", 1), "a2": make_adapter(base, root / "a2", 2)}
    config = ServerConfig(model_name="base", lora_modules={n: str(f[0]) for n, f in folders.items()},
                          allow_runtime_lora=True)
    with running_server(tinylm.load(base), config) as (url, app):
        yield url, app, base, folders


def _expected(folder) -> str:
    params = tinylm.SamplingParams(**{k: v for k, v in GREEDY.items()})
    return tinylm.load(folder).generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text


def _complete(url, model, **extra):
    reply = post(url, "/v1/completions", {"model": model, "prompt": PROMPT, **GREEDY, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_adapters_and_the_base_model_in_one_batch_equal_their_merged_models(served):
    url, _, base, folders = served
    models = ["base", "a1", "a2"] * 3
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(lambda m: _complete(url, m), models))
    expected = {"base": _expected(base), "a1": _expected(folders["a1"][1]), "a2": _expected(folders["a2"][1])}
    assert len(set(expected.values())) == 3
    for model, reply in zip(models, replies):
        assert reply["model"] == model and reply["choices"][0]["text"] == expected[model]


def test_models_lists_the_adapters(served):
    url, _, _, folders = served
    import httpx
    data = httpx.get(url + "/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("base", None), ("a1", "base"), ("a2", "base")]
    assert data[1]["root"] == str(folders["a1"][0])


def test_chat_and_tgi_select_adapters(served):
    url, _, _, folders = served
    chat = post(url, "/v1/chat/completions", {"model": "a2", "messages": [{"role": "user", "content": "Hi"}],
                                              **GREEDY}).json()
    assert chat["model"] == "a2" and chat["choices"][0]["message"]["content"]
    tgi = post(url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "adapter_id": "a1"}})
    assert tgi.json()["generated_text"] == _complete(url, "a1")["choices"][0]["text"]
    missing = post(url, "/generate", {"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert missing.status_code == 422 and "nope" in missing.json()["error"]
    assert post(url, "/v1/completions", {"model": "nope", "prompt": "x"}).status_code == 404


def test_load_and_unload_while_serving(served):
    url, _, _, folders = served
    loaded = post(url, "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(folders["a1"][0])})
    assert loaded.status_code == 200, loaded.text
    assert _complete(url, "a3")["choices"][0]["text"] == _complete(url, "a1")["choices"][0]["text"]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "a3"}).status_code == 200
    assert post(url, "/v1/completions", {"model": "a3", "prompt": "x"}).status_code == 404
    again = post(url, "/v1/unload_lora_adapter", {"lora_name": "a3"})
    assert again.status_code == 400 and "a3" in again.json()["error"]["message"]
    bad = post(url, "/v1/load_lora_adapter", {"lora_name": "a4", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and "not a readable LoRA adapter" in bad.json()["error"]["message"]


def test_runtime_loading_is_off_by_default(server):
    url, _ = server
    reply = post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"})
    assert reply.status_code == 403 and "--allow-runtime-lora" in reply.json()["error"]["message"]
