"""The notification API fuzzed from its own OpenAPI document (schemathesis), through uvicorn.

As ``tests/test_api_fuzz.py`` does for the services of the sign-up stack: with an admin token
no request gets a 5xx, without one a protected route only refuses (401/403), and every error
is problem details. The stream is left out: an authorized request to it is a stream that does
not end (its inputs are covered by the property tests of their parsers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from tributary.testkit.infra import Found

from .sse import Served, served

STREAM = "/users/{user_id}/notifications/stream"
FUZZ = settings(
    max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture
async def service(sqlite_url: str, rabbitmq: Found) -> AsyncIterator[Served]:
    async with served(sqlite_url, rabbitmq.url) as running:
        yield running


def _problem_shaped(response: Any) -> None:
    if response.status_code < 400:
        return
    assert response.headers["content-type"][0].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == response.status_code
    assert {"type", "title", "detail"} <= set(body)


def _fuzz_all(url: str, check: Callable[[Any], None], modes: tuple[GenerationMode, ...]) -> int:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        if result.ok().path != STREAM:
            operations.append(result.ok())
    for operation in operations:
        for mode in modes:

            @FUZZ
            @given(case=operation.as_strategy(mode))
            def fuzz(case: Any) -> None:
                check(case)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
    return len(operations)


# Hypothesis flags a strategy that uses the global `random` by comparing its state around each
# draw; the server runs on the event loop meanwhile (retry jitter uses `random`), which it
# would take for the strategy's doing.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_fuzzed_requests_get_no_server_error_and_unauthorized_ones_only_refusals(
    service: Served,
) -> None:
    admin = service.tokens.headers()

    def as_admin(case: Any) -> None:
        response = case.call(base_url=service.url, headers=admin, timeout=10)
        assert response.status_code < 500, (case.operation.label, response.text)
        _problem_shaped(response)

    def without_token(case: Any) -> None:
        for name in list(case.headers or {}):
            if name.lower() == "authorization":
                del case.headers[name]
        response = case.call(base_url=service.url, timeout=10)
        if case.operation.definition.raw.get("security"):
            assert response.status_code in (401, 403), (case.operation.label, response.text)
        else:
            assert response.status_code < 500, (case.operation.label, response.text)
        _problem_shaped(response)

    # schemathesis calls synchronously: in a thread, while the server runs on this loop
    both = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    assert await asyncio.to_thread(_fuzz_all, service.url, as_admin, both) >= 10
    # valid requests only: a body that is not JSON is refused (422) before the token is read
    await asyncio.to_thread(_fuzz_all, service.url, without_token, (GenerationMode.POSITIVE,))
