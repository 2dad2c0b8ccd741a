"""`tinylm bench --serve`: tinylm timed through its HTTP server under load. The server (uvicorn and the engine)
runs in this process on a free local port; each of a batch's B prompts is one client streaming /v1/completions,
all B at once, so the figures include HTTP, JSON and the engine's continuous batching of concurrent requests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

from tinylm.bench.systems import WARM_TOKENS, _release
from tinylm.bench.timing import Stamps

START_TIMEOUT_S = 120  # the app compiles the decode graphs (with --compile) before it serves


class ServedTinyLMSystem:
    def __init__(self, llm, max_clients: int, name: str, label: str) -> None:
        try:
            import httpx  # noqa: F401  (the clients; a development dependency, not a runtime one)
        except ImportError as exc:
            raise ValueError("--serve needs httpx installed (pip install httpx)") from exc
        self.name, self.label = name, f"{label}, through `tinylm serve`, one streaming client per prompt"
        self.server, self.thread, self.url = _start_server(llm, max_clients)

    def skip_reason(self, batch: int) -> str | None:
        return None

    def warm(self, prompts: list[list[int]]) -> None:
        self.run(prompts, WARM_TOKENS)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Stamps:
        return asyncio.run(_clients(self.url, prompts, new_tokens))

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.server = None
        _release()


def _start_server(llm, max_clients: int):
    import uvicorn

    from tinylm.server.app import ServerConfig, create_app

    # the run's engine settings (compile, K/V cache dtype, ...) with room for every client at once
    engine = dataclasses.replace(llm.engine_config, max_num_seqs=max(max_clients, llm.engine_config.max_num_seqs))
    app = create_app(llm, ServerConfig(model_name="bench", engine=engine, sampling_defaults={}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the benchmark's tinylm server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


async def _clients(url: str, prompts: list[list[int]], new_tokens: int) -> Stamps:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(_one_client(client, url, prompt, new_tokens) for prompt in prompts))
    return Stamps(start, list(results), None)


async def _one_client(client, url: str, prompt: list[int], new_tokens: int) -> list[float]:
    """One streaming request; a time per token chunk, cut to the usage count the server reports (a last chunk may
    carry only the finish reason)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    times, count = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                times.append(time.perf_counter())
            elif event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return times[:count]
