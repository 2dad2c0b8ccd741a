"""Errors as each HTTP dialect expects them, and the handlers that turn every failure into one.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}` with the status itself (400, 401, 404, 408,
413, 429, 500); TGI routes (`/generate*`) answer `{"error", "error_type"}` with 422 for bad input, as TGI's router
does. Nothing a client sends reaches it as a traceback.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinylm.engine.engine import QueueFullError
from tinylm.errors import TinyLMError

# Request fields tinylm knows but does not implement: named in the 400 so a client learns why, never ignored.
NOT_IMPLEMENTED_FIELDS = {
    "functions": "function calling (functions) is not supported by this server",
    "function_call": "function calling (function_call) is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
    "prediction": "predicted outputs (prediction) are not supported by this server",
    "web_search_options": "web search is not supported by this server",
    "reasoning_effort": "reasoning_effort is not supported by this server; use chat_template_kwargs",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def is_tgi_route(path: str) -> bool:
    return path.startswith("/generate")


def error_body(path: str, status: int, message: str, kind: str = "invalid_request_error",
               param: str | None = None) -> tuple[dict, int]:
    """(JSON body, status) of an error in the dialect of the route at `path`."""
    if is_tgi_route(path):
        tgi_kind = {408: "timeout", 429: "overloaded", 500: "generation"}.get(status, "validation")
        return {"error": message, "error_type": tgi_kind}, 422 if status == 400 else status
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}, status


def error_response(path: str, status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    body, status = error_body(path, status, message, kind, param)
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        message, param = describe_validation(exc)
        return error_response(request.url.path, 400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request.url.path, exc.status_code, _http_message(exc))

    @app.exception_handler(APIError)
    @app.exception_handler(QueueFullError)
    @app.exception_handler(TinyLMError)
    @app.exception_handler(ValueError)
    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        return error_response(request.url.path, *exception_error(exc))


def exception_error(exc: Exception) -> tuple[int, str, str, str | None]:
    """(status, message, kind, param) of a request that failed with `exc`, before or after its response started."""
    if isinstance(exc, APIError):
        return exc.status, exc.message, exc.kind, exc.param
    if isinstance(exc, QueueFullError):
        return 429, str(exc), "rate_limit_exceeded", None
    if isinstance(exc, (TinyLMError, ValueError)):
        return 400, _one_line(str(exc)), "invalid_request_error", None
    return 500, _one_line(f"internal error: {type(exc).__name__}: {exc}"), "internal_error", None


def stream_error(path: str, exc: Exception) -> dict:
    """The final event of a stream that failed after it started, in the route's dialect."""
    status, message, kind, param = exception_error(exc)
    return error_body(path, status, message, kind, param)[0]


def _http_message(exc: StarletteHTTPException) -> str:
    """FastAPI reports every body it cannot parse as "There was an error parsing the body"; say which error."""
    message = str(exc.detail)
    if message != "There was an error parsing the body":
        return message
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid JSON: it is not UTF-8 text"
    return f"the request body is not valid JSON: {_one_line(str(cause)) if cause else 'parse error'}"


def describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors (the malformed JSON, an unsupported field, or the first bad
    fields) and the first field it names."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}", None
    for error in errors:
        if error.get("type") == "extra_forbidden":
            return _unsupported_field(error.get("loc", ()))
    parts = []
    for error in errors[:3]:
        parts.append(f"{_where(error.get('loc', ()))}: {error.get('msg')}")
    first = _where(errors[0].get("loc", ())) if errors else None
    return "invalid request: " + "; ".join(parts), first


def _unsupported_field(loc) -> tuple[str, str]:
    name = str(loc[-1]) if loc else "?"
    where = _where(loc)
    if name in NOT_IMPLEMENTED_FIELDS:
        return f"{NOT_IMPLEMENTED_FIELDS[name]} (field `{where}`)", where
    return f"unknown field `{where}`: this server does not implement it", where


def _where(loc) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))[:2000]
