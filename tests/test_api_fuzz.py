"""Every service's API fuzzed from its own OpenAPI document (schemathesis), as real processes.

With an admin token no request may get a 5xx; without a token a protected route may only
answer 401 or 403, and a public one never a 5xx. Every answer that is an error is RFC 9457
problem+json (the token endpoint's RFC 6749 errors excepted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .stack import SIGNUP_SERVICES, Stack

# slow: a long end-to-end run of real processes: `make test` runs it in its second pytest process,
# beside the rest of the suite
pytestmark = pytest.mark.slow

EXAMPLES = 25
"""Per operation and generation mode: some 2,000 requests over the four services."""


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _operations(stack: Stack, service: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{stack.url(service)}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _protected(case: Any) -> bool:
    return bool(case.operation.definition.raw.get("security"))


def _problem_shaped(case: Any, response: Any) -> None:
    if response.status_code < 400 or case.operation.path == "/oauth/token":
        return
    kind = response.headers.get("content-type", [""])
    kind = kind[0] if isinstance(kind, list) else kind
    assert kind.startswith("application/problem+json"), (case.operation.label, kind)
    body = response.json()
    assert body["status"] == response.status_code
    assert {"type", "title", "detail"} <= set(body)


def _fuzz(operation: Any, mode: GenerationMode, check: Callable[[Any], None]) -> None:
    @FUZZ
    @given(case=operation.as_strategy(mode))
    def fuzz(case: Any) -> None:
        check(case)

    try:
        fuzz()
    except Unsatisfiable:
        # no invalid request exists for an operation without parameters or body
        assert mode is GenerationMode.NEGATIVE, operation.label


@pytest.mark.parametrize("service", SIGNUP_SERVICES)
def test_with_an_admin_token_nothing_is_a_server_error(shared_stack: Stack, service: str) -> None:
    def check(case: Any) -> None:
        response = case.call(headers=shared_stack.admin_headers())
        assert response.status_code < 500, (case.operation.label, response.text)
        _problem_shaped(case, response)

    for operation in _operations(shared_stack, service):
        _fuzz(operation, GenerationMode.POSITIVE, check)
        _fuzz(operation, GenerationMode.NEGATIVE, check)


@pytest.mark.parametrize("service", SIGNUP_SERVICES)
def test_without_a_token_protected_routes_only_refuse(shared_stack: Stack, service: str) -> None:
    def check(case: Any) -> None:
        for name in list(case.headers or {}):
            if name.lower() == "authorization":
                del case.headers[name]
        response = case.call()
        if _protected(case):
            assert response.status_code in (401, 403), (case.operation.label, response.text)
        else:
            assert response.status_code < 500, (case.operation.label, response.text)
        _problem_shaped(case, response)

    for operation in _operations(shared_stack, service):
        _fuzz(operation, GenerationMode.POSITIVE, check)
