"""A real tinylm server on a free local port, run by uvicorn in a background thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
import uvicorn

import tinylm
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig, create_app
from tinylm.server.http import uvicorn_config
from tinylm.tiny import make_tiny


@contextlib.contextmanager
def running_server(llm, config: ServerConfig, header_timeout: float = 10.0):
    """The app behind the same uvicorn setup `tinylm serve` uses (header deadline, keep-alive timeout)."""
    app = create_app(llm, config)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, header_timeout=header_timeout))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def server(default_llm):
    """The default model served in float32 (so batched and one-at-a-time greedy outputs can be compared)."""
    config = ServerConfig(model_name="smollm2", engine=EngineConfig(max_num_seqs=32, kv_cache_bytes=512 << 20))
    with running_server(default_llm, config) as (url, app):
        yield url, app


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    return tinylm.load(make_tiny("llama", tmp_path_factory.mktemp("served") / "llama", seed=4))


def wait_until_idle(app, timeout: float = 30.0) -> None:
    engine = app.state.tinylm.engine.engine
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() or engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.05)


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120, **kwargs)
