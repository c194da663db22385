"""Identity's rate limits (sign-up per address, writes per API key) and caller-scoped keys."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import select

from tributary.identity.models import SignUpKey
from tributary.service.auth import SELF_SCOPES
from tributary.service.testing import minter
from tributary.testkit.infra import Found

from .support import Identity, identity_service, sign_up_body

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
async def identity(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: Found
) -> AsyncIterator[Identity]:
    db = tmp_path_factory.mktemp("identity-limits") / "identity.db"
    rates = {"signup": "3/hour", "writes": "3/hour"}
    async with identity_service(rabbitmq.url, f"sqlite+aiosqlite:///{db}", rates=rates) as found:
        yield found


@asynccontextmanager
async def calling_from(
    app: FastAPI, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A client at an address of its own (its own sign-up budget), with or without a token."""
    address = f"test-{uuid.uuid4().hex}"
    transport = httpx.ASGITransport(app=app, client=(address, 50000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers=headers or {}
    ) as client:
        yield client


async def test_sign_ups_over_the_rate_of_an_address_are_429(identity: Identity) -> None:
    async with calling_from(identity.app) as first, calling_from(identity.app) as second:
        allowed = [await first.post("/users", json=sign_up_body()) for _ in range(3)]
        refused = await first.post("/users", json=sign_up_body())
        elsewhere = await second.post("/users", json=sign_up_body())

    assert [r.status_code for r in allowed] == [201, 201, 201]
    assert refused.status_code == 429
    assert refused.headers["content-type"] == PROBLEM
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["type"] == "https://tributary.dev/problems/too-many-requests"
    assert elsewhere.status_code == 201


async def test_writes_are_limited_per_api_key(identity: Identity) -> None:
    async with calling_from(identity.app) as anonymous:
        user = (await anonymous.post("/users", json=sign_up_body())).json()
    tokens = minter(identity.app)
    one = {"Authorization": f"Bearer {tokens.token(user['id'], SELF_SCOPES, client_id='key_a')}"}
    two = {"Authorization": f"Bearer {tokens.token(user['id'], SELF_SCOPES, client_id='key_b')}"}
    path = f"/users/{user['id']}"

    async with calling_from(identity.app, one) as first, calling_from(identity.app, two) as second:
        answers = [await first.patch(path, json={"name": f"Ada {n}"}) for n in range(4)]
        other_key = await second.patch(path, json={"name": "Ada B"})

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["ratelimit-remaining"] for a in answers[:3]] == ["2", "1", "0"]
    assert other_key.status_code == 200


async def test_an_idempotency_key_belongs_to_its_caller(identity: Identity) -> None:
    body, other_body = sign_up_body(), sign_up_body()
    key = {"Idempotency-Key": f"signup-{uuid.uuid4().hex}"}
    tokens = minter(identity.app)
    someone = {"Authorization": f"Bearer {tokens.token('usr_someone0000000000', SELF_SCOPES)}"}
    forged = {"Authorization": "Bearer not-a-token"}

    async with calling_from(identity.app) as anonymous:
        first = await anonymous.post("/users", json=body, headers=key)
        replayed = await anonymous.post("/users", json=body, headers={**key, **forged})
    async with calling_from(identity.app, someone) as other:
        same_body = await other.post("/users", json=body, headers=key)
        new_body = await other.post("/users", json=other_body, headers=key)

    assert first.status_code == replayed.status_code == 201
    assert replayed.json()["id"] == first.json()["id"]  # an invalid token counts as none
    # another caller's key is not theirs to replay, nor to learn about (no 422)
    assert same_body.status_code == 409
    assert new_body.status_code == 201
    assert new_body.json()["id"] != first.json()["id"]
    digest = hashlib.sha256(key["Idempotency-Key"].encode()).hexdigest()
    async with identity.app.state.sessions() as session:
        stored = {row.key for row in (await session.exec(select(SignUpKey))).all()}
    assert {f"public:{digest}", f"usr_someone0000000000:{digest}"} <= stored
    assert not any(key["Idempotency-Key"] in k for k in stored)
