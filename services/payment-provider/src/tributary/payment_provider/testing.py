"""Test support: an app behind real uvicorn on a free local port, in the test's event loop.

The provider is reached over real HTTP in every test that uses it (billing's included), never
through an in-process transport: it is the external boundary.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tributary.payment_provider.app import create_app
from tributary.payment_provider.settings import Settings
from tributary.testkit.waiting import eventually


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def served(app: Any, *, port: int | None = None, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` (its lifespan included) on 127.0.0.1 until the block ends; yields its URL.

    For another process, or code under test, that must reach the app over real HTTP (a
    webhook receiver, a provider's API) rather than through an in-process transport.
    """
    port = port or free_port()
    options.setdefault("log_level", "warning")
    options.setdefault("timeout_graceful_shutdown", 5)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    task = asyncio.create_task(server.serve())

    try:

        async def listening() -> bool:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it listened")
            return bool(server.started)

        await eventually(listening, timeout=30, what="uvicorn listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


TEST_API_KEY = "pp_test_key_0123456789abcdef"
TEST_WEBHOOK_SECRET = "whsec_dGVzdC1vbmx5LXdlYmhvb2stc2VjcmV0LTAxMjM0NTY="  # noqa: S105


def provider_settings(database_url: str, webhook_url: str | None, **overrides: Any) -> Settings:
    """Settings of a provider for tests: the test key and secret, retries in fractions of a
    second; ``overrides`` by environment name (``PAYMENT_PROVIDER_…``)."""
    values: dict[str, Any] = {
        "PAYMENT_PROVIDER_DATABASE_URL": database_url,
        "PAYMENT_PROVIDER_PORT": 0,
        "PAYMENT_PROVIDER_API_KEYS": [TEST_API_KEY],
        "PAYMENT_PROVIDER_WEBHOOK_URL": webhook_url,
        "PAYMENT_PROVIDER_WEBHOOK_SECRET": TEST_WEBHOOK_SECRET,
        "PAYMENT_PROVIDER_WEBHOOK_RETRY_SECONDS": (0.1, 0.2, 0.3),
        "PAYMENT_PROVIDER_WEBHOOK_TIMEOUT_SECONDS": 2.0,
        "PAYMENT_PROVIDER_POLL_SECONDS": 0.2,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@dataclass
class RunningProvider:
    app: FastAPI
    url: str
    client: httpx.AsyncClient
    """Calls the API with the test key."""

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        sessions: async_sessionmaker[AsyncSession] = self.app.state.sessions
        return sessions

    async def checkout(self, amount_cents: int = 900, reference: str = "ref-1") -> dict[str, Any]:
        response = await self.client.post(
            "/checkouts",
            json={"amount_cents": amount_cents, "currency": "EUR", "reference": reference},
        )
        assert response.status_code == 201, response.text  # noqa: S101
        created: dict[str, Any] = response.json()
        return created

    async def pay(self, checkout_id: str, outcome: str, **more: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url) as payer:  # no API key: the payer
            return await payer.post(
                f"/checkouts/{checkout_id}/pay", json={"outcome": outcome, **more}
            )


@asynccontextmanager
async def running_provider(
    database_url: str, webhook_url: str | None, **overrides: Any
) -> AsyncIterator[RunningProvider]:
    """A provider behind real uvicorn, sending its webhooks to ``webhook_url``."""
    app = create_app(provider_settings(database_url, webhook_url, **overrides))
    async with (
        served(app) as url,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TEST_API_KEY}"}, timeout=10
        ) as client,
    ):
        yield RunningProvider(app, url, client)


@dataclass
class Received:
    id: str
    timestamp: str
    body: dict[str, Any]
    verified: bool


@dataclass
class WebhookReceiver:
    """A merchant's webhook endpoint: verifies each request with the standardwebhooks
    package and answers ``answers`` in turn (then 200); ``hang`` seconds before answering."""

    url: str = ""
    secret: str = TEST_WEBHOOK_SECRET
    requests: list[Received] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    hang: list[float] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hooks")
        async def hook(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            try:
                parsed = Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                parsed, verified = {}, False
            self.requests.append(
                Received(headers["webhook-id"], headers["webhook-timestamp"], parsed, verified)
            )
            self.changed.set()
            if self.hang:
                await asyncio.sleep(self.hang.pop(0))
            status = self.answers.pop(0) if self.answers else 200
            return Response(status_code=status)

        return app

    def of_type(self, type_: str) -> list[Received]:
        return [r for r in self.requests if r.body.get("type") == type_]

    async def wait(self, count: int, timeout: float = 10.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.requests
