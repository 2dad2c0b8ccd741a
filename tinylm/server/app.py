"""The HTTP app: OpenAI routes, TGI routes, health, metrics.

Every failure a client can cause becomes a JSON error with a clear message (tinylm/server/errors.py): 400 on
OpenAI routes, 422 on TGI routes, 401 without the API key, 408 for a body that does not arrive in time or a
request past its time limit, 413 for an oversized body, 429 when the queue is full. An internal error fails that
request with 500, never the server. CPU work of a request (templates, tokenizing) runs off the event loop, so
/health answers while it runs.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from tinylm import hub
from tinylm.engine.async_engine import AsyncEngine
from tinylm.engine.engine import EngineConfig
from tinylm.server.errors import install_error_handlers
from tinylm.server.metrics import Metrics
from tinylm.server.middleware import ApiKey, ReadBody, RequestLog
from tinylm.server.openapi import ERROR_RESPONSES, document_errors


@dataclass
class ServerConfig:
    model_name: str = "tinylm"
    max_body_bytes: int = 4 << 20  # requests larger than this are refused with 413
    engine: EngineConfig | None = None  # None: EngineConfig()'s defaults, not the LLM's engine_config
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`
    body_timeout: float = 30.0  # seconds a client may take to send its body (408 after)
    request_timeout: float = 600.0  # seconds a request may run, streaming included (408 after)
    max_messages: int = 1024  # chat messages per request
    max_prompt_bytes: int | None = None  # prompt text per request before tokenizing; None: 32 bytes a context token
    trust_request_chat_template: bool = False  # allow requests to send their own chat template source
    sampling_defaults: dict | None = None  # the model's recommended sampling; None: read from the model's folder
    cpu_workers: int = 4  # threads that tokenize and render templates for requests
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapter name -> PEFT folder, served unmerged
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter (they read server paths)


GIL_SWITCH_INTERVAL_S = 0.0005  # how long the engine thread may wait for the event loop's GIL (see lifespan)


@dataclass
class ServerState:
    """What the routes need, kept on app.state.tinylm."""

    llm: object  # tinylm.LLM
    engine: AsyncEngine
    metrics: Metrics
    config: ServerConfig
    sampling_defaults: dict = field(default_factory=dict)
    live_queues: set = field(default_factory=set)  # one asyncio.Queue per running request (generation.py)
    cpu_limiter: anyio.CapacityLimiter | None = None

    @property
    def max_prompt_bytes(self) -> int:
        return self.config.max_prompt_bytes or max(64 << 10, 32 * self.llm.config.max_position_embeddings)


def create_app(llm, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    # The LLM's own engine, (re)configured for serving: one engine per LLM, which llm.generate() uses again once
    # the server stops (LLM.engine_for; an engine another running server steps is not shared)
    engine = llm.engine_for(config.engine or EngineConfig())
    # compiles the batch-1 decode graph before the server answers, the batched one meanwhile (with --compile only)
    engine.warmup(background=True)
    for name, path in config.lora_modules.items():
        if name not in engine.loras.ids:  # the LLM's engine may hold them from an earlier server
            engine.load_lora(name, path)
    metrics = Metrics(engine)
    defaults = config.sampling_defaults
    if defaults is None:
        defaults = hub.recommended_sampling(llm.loaded.source) if llm.loaded.source.is_dir() else {}
    state = ServerState(llm, AsyncEngine(engine, on_output=metrics.on_output), metrics, config, dict(defaults))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.cpu_limiter = anyio.CapacityLimiter(config.cpu_workers)
        # The engine thread hands a step's outputs to this loop, which then holds the GIL while it writes every
        # stream's event; the engine thread, back from the hand-off, waits for the GIL up to the switch interval
        # (5 ms by default) before its next step. A tiny model's engine spent a quarter of its samples there.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, GIL_SWITCH_INTERVAL_S))
        state.engine.start()
        yield
        state.engine.shutdown()
        sys.setswitchinterval(switch_interval)

    app = FastAPI(title="tinylm", version=_version(), lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.tinylm = state
    install_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(ReadBody, limit=config.max_body_bytes, timeout=config.body_timeout)
    if config.api_key:
        app.add_middleware(ApiKey, key=config.api_key)
    app.add_middleware(RequestLog, metrics=metrics)  # outermost: logs refusals by the others too
    document_errors(app)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    from tinylm.server import lora_routes, openai_routes, tgi_routes

    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.include_router(lora_routes.router)

    @app.get("/health", response_class=Response, responses={
        200: {"description": "The engine is running", "content": {"text/plain": {}}},
        503: {"description": "The engine thread has stopped", "content": {"text/plain": {}}}})
    async def health() -> Response:
        return Response(status_code=200 if state.engine.is_alive else 503, media_type="text/plain")

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain; version=0.0.4": {}}}})
    async def prometheus() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _version() -> str:
    import tinylm

    return tinylm.__version__


async def drain(state: ServerState, grace: float) -> int:
    """SIGTERM: let running requests finish for most of the grace period, then end the rest with a final error
    (an event on streams, an error body otherwise) before the server closes connections. Returns how many were
    ended that way."""
    from tinylm.server.generation import stop_live_requests

    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, grace - min(1.0, grace / 2))  # room to send the final events
    while state.live_queues and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return stop_live_requests(state)
