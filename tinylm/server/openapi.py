"""The OpenAPI document says what the server does: every error status a route can answer, with its body.

FastAPI documents 422 with its own validation body for every route that takes one; tinylm answers bad input with
400 and an OpenAI error body on OpenAI routes, and with 422 and TGI's `{"error", "error_type"}` on TGI routes.
`document_errors` rewrites the generated document to match.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIError(BaseModel):
    error: ErrorDetail


class TGIError(BaseModel):
    error: str
    error_type: str


def _openai(description: str) -> dict:
    return {"model": OpenAIError, "description": description}


ERROR_RESPONSES = {
    400: _openai("Bad input: a malformed body, an unknown or unsupported field, an out-of-range value"),
    401: _openai("Missing or wrong API key (servers started with --api-key)"),
    404: _openai("The model named in the request is not the one served"),
    408: _openai("The body did not arrive in time, or the request ran past the server's time limit"),
    413: _openai("The body is larger than the server's limit"),
    429: _openai("The request queue is full"),
    500: _openai("An internal error failed this request (the server keeps running)"),
    503: _openai("The server is shutting down"),
}

_TGI_STATUSES = {401: "Missing or wrong API key", 408: "The body did not arrive in time, or the request ran "
                 "past the time limit", 413: "The body is larger than the server's limit",
                 422: "Bad input (TGI's validation error)", 429: "The request queue is full",
                 500: "An internal error failed this request", 503: "The server is shutting down"}
_NO_BODY_ROUTES = ("/health", "/metrics", "/v1/models", "/info")
# Routes that answer with server-sent events: always (/generate_stream), or when the body says stream=true
_EVENT_STREAMS = {"/generate_stream": True, "/generate": False, "/v1/completions": False,
                  "/v1/chat/completions": False}


def document_errors(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _rewrite(schema)
            _bound_token_ids(schema, app.state.tinylm.llm.config.vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _rewrite(schema: dict) -> None:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["TGIError"] = TGIError.model_json_schema()
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if path in _EVENT_STREAMS:
                _event_stream(responses, only=_EVENT_STREAMS[path])
            if path.startswith("/generate"):
                _tgi_errors(responses)
            else:
                responses.pop("422", None)
            if path in _NO_BODY_ROUTES:  # no body, no model field: these cannot be 400 / 404 / 413
                for status in ("400", "404", "413", "429", "422", "408", "503"):
                    responses.pop(status, None)
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _event_stream(responses: dict, only: bool) -> None:
    ok = responses.setdefault("200", {"description": "Successful Response"})
    content = {} if only else ok.get("content", {})
    # Each `data:` line is one JSON event (OpenAI streams end with `data: [DONE]`)
    content["text/event-stream"] = {"schema": {"description": "one JSON event per data line"}}
    ok["content"] = content


def _bound_token_ids(node, vocab_size: int) -> None:
    """Token id fields (marked `x-token-id` in tinylm/server/protocol.py) take [0, vocab_size)."""
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def _tgi_errors(responses: dict) -> None:
    for status in ("400", "404"):
        responses.pop(status, None)
    reference = {"application/json": {"schema": {"$ref": "#/components/schemas/TGIError"}}}
    for status, description in _TGI_STATUSES.items():
        responses[str(status)] = {"description": description, "content": reference}
