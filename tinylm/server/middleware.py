"""ASGI middleware of the server (pure ASGI, not BaseHTTPMiddleware, so handlers still see a client's disconnect):

- `ReadBody`: the whole body is read before any route runs, within a size limit (413, also for chunked bodies
  that declare no length) and a time limit (408: a client that sends part of a body and stalls frees its slot).
- `ApiKey`: `Authorization: Bearer KEY` on every route but /health (as vLLM's --api-key).
- `RequestLog`: counts responses by route and status for /metrics and writes one access-log line per request
  (method, route, status, tokens, latency).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from tinylm.server.errors import error_body

access_log = logging.getLogger("tinylm.access")


async def send_error(scope, send, status: int, message: str, kind: str = "invalid_request_error",
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error response in the route's dialect, sent straight through ASGI (before any route ran)."""
    body, status = error_body(scope.get("path", ""), status, message, kind)
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class ReadBody:
    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(scope, send, 413, self._too_large())
        try:
            body, disconnected = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            message = f"the request body did not arrive within {self.timeout:g} s"
            return await send_error(scope, send, 408, message, headers=[(b"connection", b"close")])
        except _TooLarge:
            return await send_error(scope, send, 413, self._too_large(), headers=[(b"connection", b"close")])
        if disconnected:
            return None
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.limit} bytes"


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then the client's own messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _TooLarge(Exception):
    pass


class ApiKey:
    OPEN_PATHS = ("/health",)

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.OPEN_PATHS or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return await send_error(scope, send, 401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                    "authentication_error", headers=[(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class RequestLog:
    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500
        state = scope.setdefault("state", {})  # routes put their token counts in request.state.usage

        async def logging_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if scope.get("path") != "/metrics":
                    self.metrics.requests.labels(scope.get("path", ""), str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            _log_line(scope, status, state.get("usage"), time.monotonic() - start)


def _log_line(scope, status: int, usage, seconds: float) -> None:
    if scope.get("path") in ("/health", "/metrics") and status == 200:
        return  # probes would drown the log
    client = scope.get("client") or ("-", 0)
    tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage else ""
    access_log.info('%s:%s "%s %s" %d%s %.0fms', client[0], client[1], scope.get("method"), scope.get("path"),
                    status, tokens, seconds * 1000)
