"""Every error answers RFC 9457 problem details: the shape, the fields named, headers kept."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException, Query
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from tributary.service import problems
from tributary.service.correlation import CorrelationMiddleware
from tributary.service.problems import (
    MEDIA_TYPE,
    TYPE_BASE,
    Problem,
    conflict,
    invalid,
    not_found,
    problem_responses,
)

PII = "ada.lovelace@example.com"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=10)]
    count: Annotated[int, Field(ge=0)]
    tags: list[Annotated[str, Field(max_length=5)]] = Field(default_factory=list, max_length=3)
    owner: Annotated[str, Field(max_length=5)] | None = None


def problem_app() -> FastAPI:
    app = FastAPI()
    problems.install(app)
    app.add_middleware(CorrelationMiddleware)

    @app.post("/items", status_code=201, responses=problem_responses(409))
    async def create(item: Item) -> Item:
        return item

    @app.get("/items/{item_id}", responses=problem_responses(404))
    async def read(item_id: int, limit: Annotated[int, Query(le=5)] = 1) -> dict[str, int]:
        if item_id == 0:
            raise not_found("There is no item 0.", field="path.item_id", message="no such item")
        return {"id": item_id}

    @app.get("/conflict", responses={429: {"description": "Too many, as problem details"}})
    async def clash() -> None:
        raise conflict("The name is taken.", field="body.name", message="is taken")

    @app.get("/header")
    async def header(x_token: Annotated[str, Header(min_length=3)]) -> None:
        raise invalid("header.X-Token", "is not known", "unknown_token")

    @app.get("/unauthorized")
    async def unauthorized() -> None:
        raise HTTPException(
            401, detail="the token has expired", headers={"WWW-Authenticate": "Bearer"}
        )

    @app.get("/busy")
    async def busy() -> None:
        raise Problem(503, "Try again later.", headers={"Retry-After": "7"})

    @app.get("/legacy")
    async def legacy() -> None:
        raise HTTPException(
            422, [{"loc": ["query", "cursor"], "msg": "bad", "type": "value_error"}]
        )

    @app.get("/bare")
    async def bare() -> None:
        raise HTTPException(418)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"the database said something about {PII}")

    return app


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return problem_app()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def problem_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The body, once its shape is checked: RFC 9457 members, our type scheme."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert set(body) <= {"type", "title", "status", "detail", "errors"}
    assert body["type"].startswith(TYPE_BASE)
    assert body["title"]
    assert body["detail"]
    assert body["status"] == status
    return body


def fields(body: dict[str, Any]) -> list[str]:
    return [error["field"] for error in body["errors"]]


async def test_a_body_validation_error_names_each_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/items", json={"name": "", "tags": ["ok", "too long"], "owner": PII, "extra": 1}
    )

    body = problem_of(response, 422)
    assert body["type"] == TYPE_BASE + "validation-error"
    assert body["title"] == "Validation Failed"
    assert sorted(fields(body)) == [
        "body.count",
        "body.extra",
        "body.name",
        "body.owner",
        "body.tags.1",
    ]
    kinds = {e["field"]: e["type"] for e in body["errors"]}
    assert kinds["body.count"] == "missing"
    assert kinds["body.extra"] == "extra_forbidden"
    assert all(e["message"] for e in body["errors"])
    assert PII not in response.text  # pydantic's input is never echoed


async def test_query_path_and_header_errors_are_named_by_location(
    client: httpx.AsyncClient,
) -> None:
    query = problem_of(await client.get("/items/1", params={"limit": 6}), 422)
    path = problem_of(await client.get("/items/one"), 422)
    header = problem_of(await client.get("/header", headers={"X-Token": "x"}), 422)
    own = problem_of(await client.get("/header", headers={"X-Token": "xyz"}), 422)

    assert fields(query) == ["query.limit"]
    assert fields(path) == ["path.item_id"]
    assert fields(header) == ["header.x-token"]
    assert own["errors"] == [
        {"field": "header.X-Token", "message": "is not known", "type": "unknown_token"}
    ]


async def test_malformed_json_is_a_validation_problem_on_the_body(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/items", content=b'{"name": ', headers={"content-type": "application/json"}
    )

    body = problem_of(response, 422)
    [error] = body["errors"]
    assert (error["field"], error["type"]) == ("body", "json_invalid")


async def test_not_found_and_conflict_name_their_field(client: httpx.AsyncClient) -> None:
    missing = problem_of(await client.get("/items/0"), 404)
    clash = problem_of(await client.get("/conflict"), 409)

    assert missing["type"] == TYPE_BASE + "not-found"
    assert missing["errors"] == [
        {"field": "path.item_id", "message": "no such item", "type": "not_found"}
    ]
    assert clash["type"] == TYPE_BASE + "conflict"
    assert fields(clash) == ["body.name"]


async def test_http_exceptions_become_problems_keeping_their_headers(
    client: httpx.AsyncClient,
) -> None:
    unauthorized = await client.get("/unauthorized")
    busy = await client.get("/busy")

    body = problem_of(unauthorized, 401)
    assert (body["type"], body["title"]) == (TYPE_BASE + "unauthorized", "Unauthorized")
    assert body["detail"] == "the token has expired"
    assert "errors" not in body
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    assert problem_of(busy, 503)["type"] == TYPE_BASE + "service-unavailable"
    assert busy.headers["retry-after"] == "7"
    teapot = problem_of(await client.get("/bare"), 418)
    assert teapot["detail"] == teapot["title"] == "I'm a Teapot"
    assert teapot["type"] == TYPE_BASE + "im-a-teapot"


async def test_a_fastapi_style_error_list_becomes_errors(client: httpx.AsyncClient) -> None:
    body = problem_of(await client.get("/legacy"), 422)
    assert body["errors"] == [{"field": "query.cursor", "message": "bad", "type": "value_error"}]


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    problem_of(await client.get("/nowhere"), 404)
    wrong_method = await client.delete("/items/1")
    assert problem_of(wrong_method, 405)["type"] == TYPE_BASE + "method-not-allowed"
    assert wrong_method.headers["allow"] == "GET"


async def test_an_unhandled_error_is_a_500_problem_without_its_text_and_is_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "tributary.service.problems"):
        response = await client.get("/boom", headers={"X-Correlation-ID": "boom-1"})

    body = problem_of(response, 500)
    assert body["type"] == TYPE_BASE + "internal-server-error"
    assert PII not in response.text
    assert "RuntimeError" not in response.text
    assert response.headers["x-correlation-id"] == "boom-1"
    [record] = [r for r in caplog.records if r.name == "tributary.service.problems"]
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "GET /boom" in record.getMessage()


def test_openapi_documents_problem_answers(app: FastAPI) -> None:
    schema = app.openapi()
    ref = {"$ref": "#/components/schemas/ProblemDetail"}
    create = schema["paths"]["/items"]["post"]["responses"]
    read = schema["paths"]["/items/{item_id}"]["get"]["responses"]

    assert create["422"]["content"] == {MEDIA_TYPE: {"schema": ref}}
    assert create["409"]["content"] == {MEDIA_TYPE: {"schema": ref}}
    assert read["404"]["content"] == {MEDIA_TYPE: {"schema": ref}}
    assert create["default"]["content"] == {MEDIA_TYPE: {"schema": ref}}
    assert schema["paths"]["/conflict"]["get"]["responses"]["429"]["content"] == {
        MEDIA_TYPE: {"schema": ref}
    }
    assert "application/json" in create["201"]["content"]
    components = schema["components"]["schemas"]
    assert {"ProblemDetail", "ProblemFieldError"} <= set(components)
    assert "HTTPValidationError" not in components
    assert "ValidationError" not in components
    assert app.openapi() is schema  # built and rewritten once


def test_problem_responses_document_each_code() -> None:
    documented = problem_responses(404, 429)
    assert set(documented) == {404, 429}
    assert documented[429]["description"] == "Too Many Requests"


# -- property tests ----------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
ITEM_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "name": JSON | st.text(max_size=12),
        "count": JSON | st.integers(),
        "tags": JSON | st.lists(st.text(max_size=7), max_size=5),
        "owner": JSON,
    },
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=JSON | ITEM_LIKE)
async def test_any_json_body_is_accepted_or_a_422_naming_body_fields(
    app: FastAPI, body: Any
) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/items", json=body)

    if response.status_code == 201:
        return
    problem = problem_of(response, 422)
    assert problem["errors"]
    assert all(field == "body" or field.startswith("body.") for field in fields(problem))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=60))
async def test_any_bytes_as_a_json_body_are_a_problem_never_500(app: FastAPI, raw: bytes) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/items", content=raw, headers={"content-type": "application/json"}
        )
    if response.status_code != 201:
        # 400: not UTF-8; 422: not JSON, or not an item
        assert problem_of(response, response.status_code)["status"] in (400, 422)
