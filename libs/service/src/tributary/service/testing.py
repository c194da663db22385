"""Test support for services: run an app's lifespan in-process, tokens, fake outboxes."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from jwt.algorithms import OKPAlgorithm
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.events import Payload
from tributary.contracts.validation import validate
from tributary.messaging.db import create_engine, session_factory
from tributary.service.auth import ADMIN_SCOPES, SELF_SCOPES, AuthSettings, Verifier

ADMIN_SUBJECT = "usr_testadmin00000000000"


class TokenMinter:
    """Signs access tokens as identity would, with a key of its own; also their key source.

    ``running(app)`` makes the app trust it, so API tests call as whom they like without an
    identity service: ``minter.headers("usr_…", {"users:read"})``.
    """

    def __init__(self, settings: AuthSettings | None = None) -> None:
        self.settings = settings or AuthSettings()
        self.key = Ed25519PrivateKey.generate()
        self.kid = f"test-{secrets.token_hex(4)}"

    async def jwks(self, *, refresh: bool = False) -> dict[str, Any]:
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}

    def token(
        self,
        subject: str = ADMIN_SUBJECT,
        scopes: Iterable[str] = SELF_SCOPES | ADMIN_SCOPES,
        *,
        ttl: float = 300,
        **claims: Any,
    ) -> str:
        """A token for ``subject``; ``claims`` override any claim (``aud=``, ``exp=``, ...)."""
        issued = int(time.time())
        body: dict[str, Any] = {
            "iss": self.settings.issuer,
            "sub": subject,
            "aud": self.settings.audience,
            "iat": issued,
            "nbf": issued,
            "exp": int(issued + ttl),
            "jti": secrets.token_hex(8),
            "client_id": "key_test",
            "scope": " ".join(sorted(scopes)),
            **claims,
        }
        headers = {"kid": self.kid, "typ": "at+jwt"}
        return jwt.encode(body, self.key, algorithm="EdDSA", headers=headers)

    def headers(
        self, subject: str = ADMIN_SUBJECT, scopes: Iterable[str] | None = None
    ) -> dict[str, str]:
        token = self.token(subject, SELF_SCOPES | ADMIN_SCOPES if scopes is None else scopes)
        return {"Authorization": f"Bearer {token}"}

    def member(self, subject: str) -> dict[str, str]:
        """The headers of an ordinary user: the scopes every user's key gets."""
        return self.headers(subject, SELF_SCOPES)


def minter(app: FastAPI) -> TokenMinter:
    """The token minter ``running(app)`` installed."""
    found: TokenMinter = app.state.test_tokens
    return found


@asynccontextmanager
async def running(
    app: FastAPI, *, trust_test_tokens: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app's lifespan (migrations, bus, consumers) and give a client to it.

    By default the app trusts a :class:`TokenMinter` (``minter(app)``) instead of identity's
    keys, and the client calls as an admin; ``trust_test_tokens=False`` keeps the app's own
    verification (identity's token tests) and sends no token.
    """
    async with app.router.lifespan_context(app):
        headers: dict[str, str] = {}
        if trust_test_tokens:
            tokens = TokenMinter()
            app.state.test_tokens = tokens
            app.state.auth = Verifier(tokens, tokens.settings)
            headers = tokens.headers()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=headers
        ) as client:
            yield client


@dataclass
class FakeOutbox:
    """Collects what a handler emits; validates it strictly like the real one."""

    events: list[tuple[Payload, dict[str, Any]]] = field(default_factory=list)
    added: int = 0

    def add(self, payload: Payload, **kwargs: Any) -> None:
        validate(payload.routing_key, payload.model_dump(mode="json", exclude_none=True))
        self.events.append((payload, kwargs))
        self.added += 1


@dataclass
class FakeUnitOfWork:
    """A real session on a throw-away SQLite database and a fake outbox."""

    session: AsyncSession
    outbox: FakeOutbox = field(default_factory=FakeOutbox)
    is_replay: bool = False
    suppress_side_effects: bool = False


@asynccontextmanager
async def fake_uow(path: str) -> AsyncIterator[FakeUnitOfWork]:
    """``path``: an SQLite file; every SQLModel table is created in it."""
    engine: AsyncEngine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.run_sync(SQLModel.metadata.create_all)
    async with session_factory(engine)() as session:
        yield FakeUnitOfWork(session)
        await session.commit()
    await engine.dispose()
