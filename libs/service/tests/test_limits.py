"""Body size (413) and rate limits (429): refused early, as problem details, Redis shared."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header, Request, Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tributary.service import limits, problems
from tributary.service.caching import no_store
from tributary.service.limits import LimitSettings, RateLimiter, declared_length, rate_limit
from tributary.service.problems import MEDIA_TYPE, TYPE_BASE
from tributary.testkit.processes import free_port
from tributary.testkit.waiting import eventually

LIMIT = 100
REDIS = "redis://127.0.0.1:6379/0"


class Note(BaseModel):
    text: str


async def fake_auth(request: Request, x_key: Annotated[str | None, Header()] = None) -> None:
    """What the auth dependency leaves behind: the principal, with its API key id."""
    if x_key is not None:
        request.state.principal = SimpleNamespace(subject="usr_test", client_id=x_key)


def limited_app(limiter: RateLimiter | None = None, *, max_bytes: int = LIMIT) -> FastAPI:
    app = FastAPI()
    app.state.reads = 0
    limits.install(app, LimitSettings(max_body_bytes=max_bytes))
    problems.install(app)
    if limiter is not None:
        app.state.rate_limiter = limiter

    @app.post("/notes", status_code=201)
    async def create(note: Note) -> Note:
        return note

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            app.state.reads += 1
            size += len(chunk)
        return {"size": size}

    @app.get("/signup", dependencies=[rate_limit("signup", per_address="3/hour")])
    async def signup() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/write", dependencies=[Depends(fake_auth), rate_limit("writes", per_key="2/hour")])
    async def write() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/secret", dependencies=[Depends(no_store)])
    async def secret() -> dict[str, str]:
        return {"secret": "shown once"}

    return app


@asynccontextmanager
async def client_of(app: FastAPI, address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture
async def limiter() -> AsyncIterator[RateLimiter]:
    found = RateLimiter()
    yield found
    await found.aclose()


@pytest.fixture
async def client(limiter: RateLimiter) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(limited_app(limiter)) as found:
        yield found


def problem_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == MEDIA_TYPE
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"].startswith(TYPE_BASE)
    assert body["title"]
    assert body["detail"]
    return body


# -- body size ---------------------------------------------------------------------------------


async def test_a_body_under_the_limit_passes(client: httpx.AsyncClient) -> None:
    response = await client.post("/notes", json={"text": "x" * (LIMIT - 20)})
    assert response.status_code == 201


async def test_a_content_length_over_the_limit_is_413_before_the_app_reads(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/raw", content=b"x" * (LIMIT + 1))

    body = problem_of(response, 413)
    assert body["type"] == TYPE_BASE + "content-too-large"
    assert str(LIMIT) in body["detail"]
    assert client._transport.app.state.reads == 0  # type: ignore[attr-defined]


async def test_a_chunked_body_over_the_limit_is_413_and_not_read_on(
    client: httpx.AsyncClient,
) -> None:
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 1
            yield b"y" * 30

    streamed = await client.post("/raw", content=chunks())
    validated = await client.post(
        "/notes", content=chunks(), headers={"content-type": "application/json"}
    )

    assert "content-length" not in streamed.request.headers
    problem_of(streamed, 413)
    problem_of(validated, 413)
    assert pulled <= 2 * (LIMIT // 30 + 1)  # reading stopped at the limit, twice


async def test_a_chunked_body_under_the_limit_passes(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"z" * 30

    response = await client.post("/raw", content=chunks())
    assert response.json() == {"size": 90}


async def test_over_real_http_both_ways_of_sending_a_big_body_are_413() -> None:
    """Through uvicorn: the 413 is answered while the rest of the body is unread."""
    app = limited_app(RateLimiter())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        assert not task.done(), "uvicorn died"
        return server.started

    try:
        await eventually(started, timeout=10, what="uvicorn to listen")

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b"c" * 40

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            declared = await client.post("/raw", content=b"d" * 4000)
            streamed = await client.post("/raw", content=chunks())
            small = await client.post("/notes", json={"text": "fine"})
        problem_of(declared, 413)
        problem_of(streamed, 413)
        assert small.status_code == 201
    finally:
        server.should_exit = True
        await task
        await app.state.rate_limiter.aclose()


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([], None),
        ([(b"content-length", b"12")], 12),
        ([(b"Content-Length", b"007")], 7),
        ([(b"content-length", b"5, 5")], 5),
        ([(b"content-length", b"5"), (b"content-length", b"5")], 5),
        ([(b"content-length", b"9" * 40)], 2**63),
    ],
)
def test_content_length_is_read_strictly(
    headers: list[tuple[bytes, bytes]], length: int | None
) -> None:
    assert declared_length(headers) == length


@pytest.mark.parametrize("value", [b"", b"-1", b"+5", b"1e3", b"0x10", b"5, 6", b" ", b"\xd9\xa3"])
def test_a_malformed_content_length_is_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match="Content-Length"):
        declared_length([(b"content-length", value)])


async def test_a_malformed_content_length_is_a_400_problem(client: httpx.AsyncClient) -> None:
    response = await client.post("/raw", content=b"abc", headers={"content-length": "three"})
    assert problem_of(response, 400)["type"] == TYPE_BASE + "bad-request"


CONTENT_LENGTH = st.one_of(
    st.binary(max_size=30),
    st.integers(min_value=-(10**6), max_value=10**30).map(lambda n: str(n).encode()),
    st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=3).map(
        lambda ns: b", ".join(str(n).encode() for n in ns)
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=CONTENT_LENGTH,
    body=st.binary(max_size=2 * LIMIT),
    path=st.sampled_from(["/raw", "/notes"]),
)
async def test_any_content_length_never_500(
    client: httpx.AsyncClient, value: bytes, body: bytes, path: str
) -> None:
    response = await client.post(
        path,
        content=body,
        headers=[(b"content-length", value), (b"content-type", b"application/json")],
    )
    assert response.status_code in (200, 201, 400, 413, 422), response.text
    if response.status_code >= 400:
        problem_of(response, response.status_code)


# -- rate limits -------------------------------------------------------------------------------


async def test_the_request_over_the_rate_is_429_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    allowed = [await client.get("/signup") for _ in range(3)]
    refused = await client.get("/signup")

    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
    assert allowed[0].headers["ratelimit-limit"] == "3"
    body = problem_of(refused, 429)
    assert body["type"] == TYPE_BASE + "too-many-requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 3600
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["retry-after"] in body["detail"]


async def test_each_address_has_its_own_budget(limiter: RateLimiter) -> None:
    app = limited_app(limiter)
    async with client_of(app, "10.0.0.1") as first, client_of(app, "10.0.0.2") as second:
        assert [(await first.get("/signup")).status_code for _ in range(4)][-1] == 429
        assert (await second.get("/signup")).status_code == 200


async def test_per_key_limits_count_each_api_key_and_keyless_calls_per_address(
    client: httpx.AsyncClient,
) -> None:
    alice = [
        (await client.post("/write", headers={"X-Key": "key_alice"})).status_code for _ in range(3)
    ]
    bob = (await client.post("/write", headers={"X-Key": "key_bob"})).status_code
    keyless = [(await client.post("/write")).status_code for _ in range(3)]

    assert alice == [200, 200, 429]
    assert bob == 200
    assert keyless == [200, 200, 429]


async def test_the_environment_replaces_a_policys_rate() -> None:
    limiter = RateLimiter.from_env(
        LimitSettings(), environ={"TRIBUTARY_RATE_SIGNUP": "1/hour", "OTHER": "x"}
    )
    try:
        assert limiter.rates == {"signup": "1/hour"}
        async with client_of(limited_app(limiter)) as client:
            statuses = [(await client.get("/signup")).status_code for _ in range(2)]
        assert statuses == [200, 429]
    finally:
        await limiter.aclose()


def test_a_malformed_rate_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="couldn't parse"):
        RateLimiter(rates={"signup": "twenty a minute"})


def test_rate_limit_needs_a_rate() -> None:
    with pytest.raises(ValueError, match="per_address"):
        rate_limit("nothing")


async def test_an_answer_with_a_secret_is_not_stored(client: httpx.AsyncClient) -> None:
    response = await client.get("/secret")
    assert (response.headers["cache-control"], response.headers["pragma"]) == (
        "no-store",
        "no-cache",
    )
    no_store(plain := Response())
    assert plain.headers["cache-control"] == "no-store"


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> str:
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", 6379)) != 0:
            pytest.fail("these tests need the Redis at 127.0.0.1:6379 (redis-server)")
    return REDIS


async def test_two_replicas_share_their_counts_in_redis(redis_url: str) -> None:
    first, second = (RateLimiter(redis_url, rates={"signup": "3/hour"}) for _ in range(2))
    assert first.shared
    address = f"test-{uuid.uuid4().hex}"  # counts of earlier runs stay in Redis for the hour
    try:
        async with (
            client_of(limited_app(first), address) as one,
            client_of(limited_app(second), address) as two,
        ):
            statuses = [
                (await (one if n % 2 else two).get("/signup")).status_code for n in range(4)
            ]
        assert statuses == [200, 200, 200, 429]
    finally:
        await first.aclose()
        await second.aclose()


async def test_when_redis_is_down_requests_go_through_and_a_warning_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", rates={"signup": "1/hour"})
    try:
        with caplog.at_level(logging.WARNING, "tributary.service.limits"):
            async with client_of(limited_app(limiter)) as client:
                answers = [await client.get("/signup") for _ in range(5)]
    finally:
        await limiter.aclose()

    assert [a.status_code for a in answers] == [200] * 5
    assert all("ratelimit-limit" not in a.headers for a in answers)
    warnings = [r for r in caplog.records if r.name == "tributary.service.limits"]
    assert len(warnings) == 1  # once per outage, not once per request
    assert "not rate limited" in warnings[0].getMessage()


async def test_after_a_redis_failure_redis_is_asked_again_after_the_pause(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(redis_url, rates={"signup": "100/hour"}, pause_seconds=0.2)
    limiter._down_until = 0.0
    limiter._down = True  # as after an outage
    try:
        with caplog.at_level(logging.INFO, "tributary.service.limits"):
            async with client_of(limited_app(limiter), f"test-{uuid.uuid4().hex}") as c:
                answer = await c.get("/signup")
    finally:
        await limiter.aclose()
    assert answer.headers["ratelimit-limit"] == "100"
    assert any("answers again" in r.getMessage() for r in caplog.records)
