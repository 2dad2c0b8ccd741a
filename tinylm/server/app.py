"""The HTTP app: OpenAI routes, TGI routes, health, metrics; errors as each dialect expects them.

Every failure a client can cause becomes a JSON error with a clear message: 400 on OpenAI routes (body
`{"error": {"message", "type", "param", "code"}}`), 422 on TGI routes (`{"error", "error_type"}`), 413 for an
oversized body, 429 when the queue is full. An internal error fails that request with 500, never the server.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinylm.engine.async_engine import AsyncEngine
from tinylm.engine.engine import EngineConfig, LLMEngine, QueueFullError
from tinylm.errors import TinyLMError
from tinylm.server.metrics import Metrics


@dataclass
class ServerConfig:
    model_name: str = "tinylm"
    max_body_bytes: int = 4 << 20  # requests larger than this are refused with 413
    engine: EngineConfig | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class ServerState:
    """What the routes need, kept on app.state.tinylm."""

    llm: object  # tinylm.LLM
    engine: AsyncEngine
    metrics: Metrics
    config: ServerConfig


def create_app(llm, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    engine = LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, config.engine,
                       draft_model=llm.draft_model)
    engine.warmup()  # compiles the decode graphs before the server answers (with --compile only)
    metrics = Metrics(engine)
    state = ServerState(llm, AsyncEngine(engine, on_output=metrics.on_output), metrics, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="tinylm", lifespan=lifespan)
    app.state.tinylm = state
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    from tinylm.server import openai_routes, tgi_routes

    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/health")
    async def health() -> Response:
        alive = state.engine.is_alive
        return Response(status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def is_tgi_route(path: str) -> bool:
    return path.startswith("/generate")


def error_response(path: str, status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    if is_tgi_route(path):
        tgi_kind = {429: "overloaded", 500: "generation"}.get(status, "validation")
        return JSONResponse({"error": message, "error_type": tgi_kind}, status_code=422 if status == 400 else status)
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, 400, _describe(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for undecodable bytes
            message = "the request body is not valid JSON: it is not UTF-8 text"
        return error_response(request.url.path, exc.status_code, message)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return error_response(request.url.path, 429, str(exc), "rate_limit_exceeded")

    @app.exception_handler(TinyLMError)
    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: Exception):
        return error_response(request.url.path, 400, str(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error_response(request.url.path, 500, f"internal error: {exc}", "internal_error")


def _describe(exc: RequestValidationError) -> str:
    """One readable line from pydantic's errors: the malformed JSON, or the first bad fields."""
    parts = []
    for error in exc.errors()[:3]:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}"
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


class _BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, by Content-Length or while streaming in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = f"the request body is larger than the limit of {self.limit} bytes"
        await error_response(scope.get("path", ""), 413, message)(scope, receive, send)


class _TooLarge(Exception):
    pass


class _CountRequests:
    """ASGI middleware: count responses by route and status. (Pure ASGI, not BaseHTTPMiddleware, so handlers
    still see the client's disconnect.)"""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/metrics":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope.get("path", ""), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
