"""schemathesis against /openapi.json of a running server: generated requests for every route (a few each)
never get a 5xx, and every response matches the document (status, content type, body schema)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import running_server
from tinylm.engine.engine import EngineConfig
from tinylm.server.app import ServerConfig

EXAMPLES_PER_ROUTE = 6
# Rules between fields (prompt tokens + max_tokens <= the context, min_tokens <= max_tokens, top_logprobs needs
# logprobs, logit_bias ids inside the vocabulary) have no JSON Schema form: the document states them as a 400, so
# a 400 for a request each of whose fields is in range does not contradict it. Every other check runs.
SKIPPED_CHECKS = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def api_schema(tiny_llm):
    # A short request limit bounds what generated requests (16 choices of hundreds of tokens) may cost
    config = ServerConfig(model_name="tiny", request_timeout=5.0, engine=EngineConfig(max_num_seqs=16))
    with running_server(tiny_llm, config) as (url, _):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_the_document_lists_every_route(api_schema):
    paths = {operation.path for operation in _operations(api_schema)}
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/health", "/metrics",
            "/tokenize", "/detokenize", "/info", "/v1/models"} <= paths


def test_every_route_keeps_its_word(api_schema):
    failures = []
    for operation in _operations(api_schema):
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case):
            case.call_and_validate(timeout=60, excluded_checks=SKIPPED_CHECKS)

        try:
            check()
        except Exception as exc:  # noqa: BLE001  (collect every route's failure, then report them all)
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
