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


def _finished(app) -> int:
    """Requests that ran to an end (any finish reason) since the server started; aborted ones never count."""
    return int(sum(child.get() for child in app.state.tinylm.metrics.finished._metrics.values()))


@pytest.mark.parametrize("stage", ["decoding", "prefill and queue"])
def test_dropped_streams_free_the_engine(default_llm, stage):
    """Long streams on the default model (4000 tokens each: minutes if they ran on) are dropped after a few
    chunks (decoding) or before their first token (one prefilling a long prompt in small chunks, the rest queued).
    The engine must be idle soon after, with no block in use, and serve the next request normally."""
    decoding = stage == "decoding"
    engine = EngineConfig(max_num_seqs=8 if decoding else 1, max_num_batched_tokens=512 if decoding else 16)
    with running_server(default_llm, ServerConfig(model_name="smollm2", engine=engine)) as (url, app):
        prompt = "Once upon a time" if decoding else "Once upon a time " * 200
        body = {"prompt": prompt, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        threads = [threading.Thread(target=_open_stream_and_drop, args=(url, body, 3 if decoding else 0))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        wait_until_idle(app, timeout=60)
        blocks = app.state.tinylm.engine.engine.blocks
        assert all(count == 0 for count in blocks.ref_counts)  # only evictable prefix-cache blocks remain
        assert _finished(app) == 0  # every dropped request was aborted, none ran to its end
        response = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


def test_dropped_non_streaming_request_is_cancelled(default_llm):
    engine = EngineConfig(max_num_seqs=2)
    with running_server(default_llm, ServerConfig(model_name="smollm2", engine=engine)) as (url, app):
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=2)
        wait_until_idle(app, timeout=60)
        assert _finished(app) == 0 and app.state.tinylm.engine.engine.num_running == 0


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


def test_sigterm_ends_long_streams_with_an_error_event(smollm2_gguf):
    """A stream still running at the end of the grace period gets a final error event (as TGI sends), not a cut
    connection; the server logs why and exits 0. (The default model: 480 tokens take it many seconds.)"""
    port = 19000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "serve", "--model", str(smollm2_gguf), "--port",
                               str(port), "--dtype", "float32", "--graceful-timeout", "2"],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "tinylm: serving" in server.stderr.readline()
        url = f"http://127.0.0.1:{port}"
        events: dict[str, list[str]] = {}

        def stream(route: str, body: dict) -> None:
            with httpx.stream("POST", url + route, json=body, timeout=60) as response:
                events[route] = [line for line in response.iter_lines() if line.startswith("data:")]

        openai = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "n": 4, "stream": True}
        tgi = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 480}}
        threads = [threading.Thread(target=stream, args=("/v1/completions", openai)),
                   threading.Thread(target=stream, args=("/generate_stream", tgi))]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.wait(30) == 0
        log = server.stderr.read()
    finally:
        server.kill()
    assert "shutting down" in events["/v1/completions"][-2] and events["/v1/completions"][-1] == "data: [DONE]"
    assert "shutting down" in events["/generate_stream"][-1]
    assert "ended 2 request(s) still running" in log and "stopped" in log
