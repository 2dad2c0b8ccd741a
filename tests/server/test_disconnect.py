"""Clients that go away cancel their generation and free its memory, whether queued, prefilling or decoding;
SIGTERM lets running requests finish and then stops the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import post, running_server, wait_until_idle
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig
from tinylm.tiny import make_tiny


def _open_stream_and_drop(url: str, body: dict, chunks: int) -> None:
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= chunks:
                break  # leaving the block closes the connection mid-stream


@pytest.mark.parametrize("stage", ["decoding", "prefill and queue"])
def test_dropped_streams_free_the_engine(tiny_llm, stage):
    # One sequence at a time and tiny prefill chunks: the first dropped stream is decoding (or prefilling a long
    # prompt), the others are still queued when their clients leave.
    engine = EngineConfig(max_num_seqs=1 if stage != "decoding" else 8, max_num_batched_tokens=4, block_size=4)
    with running_server(tiny_llm, ServerConfig(model_name="tiny", engine=engine)) as (url, app):
        prompt = "Once upon a time " * (1 if stage == "decoding" else 40)
        body = {"prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}
        threads = [threading.Thread(target=_open_stream_and_drop, args=(url, body, 3 if stage == "decoding" else 0))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait_until_idle(app)
        blocks = app.state.tinylm.engine.engine.blocks
        assert blocks.usage == 0.0 or all(c == 0 for c in blocks.ref_counts)  # only evictable prefix blocks left
        response = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


def test_dropped_non_streaming_request_is_cancelled(tiny_llm):
    engine = EngineConfig(max_num_seqs=2)
    with running_server(tiny_llm, ServerConfig(model_name="tiny", engine=engine)) as (url, app):
        body = {"prompt": "Once upon a time", "max_tokens": 100_000 // 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)
        wait_until_idle(app)
        assert app.state.tinylm.engine.engine.num_running == 0


def test_sigterm_finishes_running_requests_then_exits(tmp_path):
    folder = make_tiny("llama", tmp_path / "tiny", seed=1)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "serve", "--model", str(folder), "--port",
                               str(port), "--dtype", "float32"], stderr=subprocess.PIPE, text=True)
    try:
        ready = server.stderr.readline()
        assert "tinylm: serving" in ready, ready
        url = f"http://127.0.0.1:{port}"
        result = {}
        body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
        request = threading.Thread(target=lambda: result.update(r=post(url, "/v1/completions", body)))
        request.start()
        time.sleep(0.5)  # the request is running
        server.send_signal(signal.SIGTERM)
        request.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 200
        assert server.wait(30) == 0
    finally:
        server.kill()
