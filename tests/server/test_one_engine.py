"""One engine per LLM: create_app serves the LLM's own engine, configured with the server's EngineConfig, and
the LLM generates with it again once the server stops."""

from __future__ import annotations

import pytest

import tinylm
from tinylm.engine.engine import EngineBusyError, EngineConfig
from tinylm.server.app import ServerConfig

from tests.server.conftest import post, running_server

GREEDY = tinylm.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BODY = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def llm(load_tiny):
    return load_tiny("llama", 4)


def _served(config: EngineConfig) -> ServerConfig:
    return ServerConfig(model_name="tiny", engine=config)


def test_the_server_steps_the_llms_own_engine(llm):
    config = EngineConfig(max_num_seqs=4)
    with running_server(llm, _served(config)) as (url, app):
        assert app.state.tinylm.engine.engine is llm.engine and llm.engine.config == config
        served = post(url, "/v1/completions", BODY).json()["choices"][0]["text"]
        with pytest.raises(EngineBusyError, match="serving"):  # one thread steps an engine
            llm.generate("Once upon a time", GREEDY)
    assert llm.engine is app.state.tinylm.engine.engine and not llm.engine.has_unfinished()
    assert llm.generate("Once upon a time", GREEDY)[0].text == served


def test_each_app_reconfigures_the_idle_engine(llm):
    first, second = EngineConfig(max_num_seqs=4), EngineConfig(max_num_seqs=2)
    with running_server(llm, _served(first)) as (_, app):
        engine = app.state.tinylm.engine.engine
    with running_server(llm, _served(second)) as (url, app):
        assert app.state.tinylm.engine.engine is llm.engine is not engine and llm.engine.config == second
        assert post(url, "/v1/completions", BODY).status_code == 200
        engine = llm.engine
    with running_server(llm, _served(EngineConfig(max_num_seqs=2))) as (_, app):
        assert app.state.tinylm.engine.engine is engine  # the same config: the same engine


def test_two_running_servers_never_share_an_engine(llm):
    config = EngineConfig(max_num_seqs=4)
    with running_server(llm, _served(config)) as (url, app), running_server(llm, _served(config)) as (url2, app2):
        assert app.state.tinylm.engine.engine is not app2.state.tinylm.engine.engine is llm.engine
        texts = [post(u, "/v1/completions", BODY).json()["choices"][0]["text"] for u in (url, url2)]
        assert texts[0] == texts[1]


def test_an_engine_with_requests_is_not_replaced(llm):
    stream = llm.stream("Once upon a time", GREEDY)
    next(stream)
    with pytest.raises(EngineBusyError, match="requests"):
        llm.engine_for(EngineConfig(max_num_seqs=2))
    stream.close()  # aborts the request: the idle engine may be replaced
    assert llm.engine_for(EngineConfig(max_num_seqs=2)).config.max_num_seqs == 2
