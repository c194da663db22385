"""A running identity service for API tests: client, outbox reader, broker capture."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI
from sqlmodel import col, select

from tributary.contracts.envelope import CloudEvent
from tributary.identity.app import create_app
from tributary.identity.settings import Settings
from tributary.messaging.db import OutboxRow
from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
)
from tributary.messaging.topology import Names, declare_exchanges
from tributary.service.limits import RateLimiter
from tributary.service.testing import running


@dataclass
class Capture:
    """Every message published on a test's exchange, as a foreign consumer receives it."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float = 20.0
    ) -> AbstractIncomingMessage:
        """The first message whose CloudEvent matches ``predicate``, waiting for it to arrive."""
        async with asyncio.timeout(timeout):
            while True:
                self._arrived.clear()
                for message in self.messages:
                    if predicate(json.loads(message.body)):
                        return message
                await self._arrived.wait()


@asynccontextmanager
async def capture(url: str, names: Names) -> AsyncIterator[Capture]:
    """A private queue bound to ``#``: it also makes every event routable for the relay."""
    connection = await aio_pika.connect(url)
    try:
        await declare_exchanges(connection, names)  # before the service: it outlives the relay
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(names.exchange, routing_key="#")
        found = Capture()
        await queue.consume(found.on_message, no_ack=True)
        yield found
    finally:
        await connection.close()


@dataclass
class Identity:
    app: FastAPI
    client: httpx.AsyncClient
    broker: Capture
    outcomes: OutcomeRecorder
    rabbitmq_url: str

    async def sign_up(self, **overrides: Any) -> dict[str, Any]:
        response = await self.client.post("/users", json=sign_up_body(**overrides))
        assert response.status_code == 201, response.text
        user: dict[str, Any] = response.json()
        return user

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Publish as another service would: straight onto the exchange."""
        names = self.app.state.bus.names
        await publish_raw(self.rabbitmq_url, names, event.routing_key, event.to_bytes())

    async def events(self, user_id: str, routing_key: str | None = None) -> list[dict[str, Any]]:
        """The CloudEvents committed to the outbox about ``user_id``, oldest first."""
        async with self.app.state.sessions() as session:
            query = select(OutboxRow).order_by(col(OutboxRow.seq))
            if routing_key is not None:
                query = query.where(col(OutboxRow.routing_key) == routing_key)
            rows = (await session.exec(query)).all()
        found = [json.loads(row.body) for row in rows]
        return [e for e in found if e.get("subject") == f"users/{user_id}"]


def unique_email(domain: str = "example.com") -> str:
    return f"ada.{uuid.uuid4().hex[:12]}@{domain}"


def sign_up_body(**overrides: Any) -> dict[str, Any]:
    return {
        "email": unique_email(),
        "name": "Ada Lovelace",
        "plan": "free",
        "locale": "en-GB",
        **overrides,
    }


GENEROUS_RATES = {"signup": "100000/minute", "token": "100000/minute", "writes": "100000/minute"}


@asynccontextmanager
async def identity_service(
    rabbitmq_url: str,
    database_url: str,
    *,
    settings: Settings | None = None,
    trust_test_tokens: bool = True,
    rates: Mapping[str, str] | None = None,
) -> AsyncIterator[Identity]:
    """The real app (migrations, bus, consumers) on an isolated topology of the real broker.

    ``trust_test_tokens=False``: the app verifies tokens with its own signing keys only, and
    the client sends no token (token tests).
    """
    messaging = isolated_settings(rabbitmq_url)
    settings = (settings or Settings()).model_copy(update={"database_url": database_url, "port": 0})
    app = create_app(settings, messaging)
    # a test module signs dozens of users up from one address: limits out of the way, unless
    # a test asks for its own (``rates={"signup": "2/hour"}``)
    app.state.rate_limiter = RateLimiter(rates={**GENEROUS_RATES, **(rates or {})})
    names = Names(messaging.name_prefix)
    try:
        async with (
            capture(rabbitmq_url, names) as broker,
            running(app, trust_test_tokens=trust_test_tokens) as client,
        ):
            outcomes = OutcomeRecorder()
            app.state.bus.listeners.append(outcomes)
            yield Identity(app, client, broker, outcomes, rabbitmq_url)
    finally:
        qs = names.service_queues("identity", len(messaging.retry_tiers))
        await delete_prefixed(rabbitmq_url, names, [qs.work, qs.dlq, *qs.retries])
