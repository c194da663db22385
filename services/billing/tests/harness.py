"""Billing behind real uvicorn on the real broker, with a real payment provider (its app behind
uvicorn too, on its own database) that pays, declines and sends signed webhooks to it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook

from tributary.billing.app import create_app
from tributary.billing.commands import Billing
from tributary.billing.eventstore import StoredEvent
from tributary.billing.settings import Settings
from tributary.contracts.envelope import CloudEvent, new_event, parse_event
from tributary.contracts.events import SubscriptionActivatedV1, UserErasedV1
from tributary.messaging.db import OutboxRow
from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
    read_queue,
)
from tributary.messaging.topology import Names
from tributary.payment_provider.testing import (
    TEST_API_KEY,
    TEST_WEBHOOK_SECRET,
    RunningProvider,
    free_port,
    running_provider,
    served,
)
from tributary.service.auth import Verifier
from tributary.service.testing import TokenMinter

PUBLISHED = ("payment.#", "subscription.cancelled.#")
"""What billing publishes: bound to a probe queue (an unbound type would not be routable)."""


def new_user() -> str:
    return f"usr_{uuid.uuid4().hex[:16]}"


def signed(
    body: bytes | str,
    *,
    webhook_id: str | None = None,
    secret: str = TEST_WEBHOOK_SECRET,
    at: datetime | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed with ``secret`` at ``at`` (now)."""
    text = body.decode() if isinstance(body, bytes) else body
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, text),
    }


def notice(type_: str, data: dict[str, Any]) -> bytes:
    stamp = datetime.now(UTC).isoformat()
    return json.dumps({"type": type_, "timestamp": stamp, "data": data}).encode()


@dataclass
class Stack:
    app: FastAPI
    url: str
    client: httpx.AsyncClient
    """Calls billing as an admin."""
    provider: RunningProvider
    recorder: OutcomeRecorder
    names: Names
    broker_url: str
    probe: str

    @property
    def tokens(self) -> TokenMinter:
        tokens: TokenMinter = self.app.state.test_tokens
        return tokens

    @property
    def billing(self) -> Billing:
        billing: Billing = self.app.state.billing
        return billing

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        sessions: async_sessionmaker[AsyncSession] = self.app.state.sessions
        return sessions

    async def subscribe(self, user_id: str, plan: str = "starter") -> dict[str, Any]:
        answer = await self.client.post(
            "/subscriptions", json={"plan": plan}, headers=self.tokens.member(user_id)
        )
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def webhook(self, body: bytes, **signing: Any) -> httpx.Response:
        headers = signing.pop("headers", None) or signed(body, **signing)
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as provider_side:
            return await provider_side.post("/webhooks/payments", content=body, headers=headers)

    async def stream(self, subscription_id: str) -> list[StoredEvent]:
        async with self.sessions() as session:
            return await self.billing.store.read_stream(session, subscription_id)

    async def outbox(self, routing_key: str | None = None) -> list[dict[str, Any]]:
        """The integration events staged, as their ``data`` (of one routing key if given)."""
        async with self.sessions() as session:
            query = select(OutboxRow).order_by(col(OutboxRow.seq))
            if routing_key is not None:
                query = query.where(col(OutboxRow.routing_key) == routing_key)
            rows = (await session.exec(query)).all()
        return [parse_event(row.body).data for row in rows]

    async def published(self, expect: int) -> list[tuple[str, dict[str, Any]]]:
        """``expect`` events billing published, as the broker has them (routing key, data)."""
        found = await read_queue(self.broker_url, self.probe, expect=expect)
        return [(m.routing_key or "", parse_event(m.body).data) for m in found]

    async def deliver(self, event: CloudEvent[Any], times: int = 1) -> None:
        """Publish ``event`` as its producer would, ``times`` times; wait until handled."""
        key = event.type.removeprefix("com.tributary.")
        for _ in range(times):
            await publish_raw(self.broker_url, self.names, key, event.to_bytes())
        await self.recorder.wait(
            lambda: len(self.recorder.of(event.id)) >= times, what=f"{event.id} x{times}"
        )

    async def metric(self, name: str, **labels: str) -> float:
        """A sample of ``GET /metrics`` (0 when absent)."""
        text = (await self.client.get("/metrics")).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.M)
        for found in pattern.finditer(text):
            parts = ",".join(sorted(found.group(1).split(",")))
            if parts == wanted:
                return float(found.group(2))
        return 0.0


def activated(user_id: str, payment_id: str, plan: str = "starter") -> CloudEvent[Any]:
    return new_event(
        routing_key="subscription.activated.v1",
        source="/services/identity",
        data=SubscriptionActivatedV1(
            subscription_id=f"sub_{uuid.uuid4().hex[:20]}",
            user_id=user_id,
            plan=plan,  # type: ignore[arg-type]
            payment_id=payment_id,
            activated_at=datetime.now(UTC),
        ),
    )


def erased(user_id: str) -> CloudEvent[Any]:
    return new_event(
        routing_key="user.erased.v1",
        source="/services/identity",
        data=UserErasedV1(user_id=user_id, erased_at=datetime.now(UTC)),
    )


def settings_for(database_url: str, provider_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "BILLING_DATABASE_URL": database_url,
        "BILLING_PORT": 0,
        "BILLING_PROVIDER_URL": provider_url,
        "BILLING_PROVIDER_API_KEY": TEST_API_KEY,
        "BILLING_PROVIDER_TIMEOUT_SECONDS": 5,
        "BILLING_WEBHOOK_SECRETS": [TEST_WEBHOOK_SECRET],
    }
    values.update(overrides)
    return Settings.model_validate(values)


@asynccontextmanager
async def probed(broker_url: str, names: Names) -> AsyncIterator[str]:
    probe = f"{names.prefix}probe.billing"
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(probe)
        for key in PUBLISHED:
            await queue.bind(names.exchange, key)
    yield probe


@asynccontextmanager
async def billing_stack(
    database_url: str,
    broker_url: str,
    workdir: Path,
    *,
    provider_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    """Billing (``database_url``) and a payment provider (SQLite in ``workdir``) that sends
    its webhooks to billing; ``provider_url`` points billing elsewhere (a provider down)."""
    messaging = isolated_settings(broker_url)
    names = Names(messaging.name_prefix)
    port = free_port()
    hooks = f"http://127.0.0.1:{port}/webhooks/payments"
    provider_db = f"sqlite+aiosqlite:///{workdir / f'provider-{uuid.uuid4().hex[:6]}.db'}"
    qs = names.service_queues("billing", len(messaging.retry_tiers))
    queues = [qs.work, qs.dlq, *qs.retries]
    try:
        async with (
            probed(broker_url, names) as probe,
            running_provider(provider_db, hooks) as provider,
        ):
            app = create_app(
                settings_for(database_url, provider_url or provider.url, **overrides), messaging
            )
            async with served(app, port=port) as url:
                queues = app.state.bus.queue_names()  # the command queues too
                tokens = TokenMinter()
                app.state.test_tokens = tokens
                app.state.auth = Verifier(tokens, tokens.settings)
                recorder = OutcomeRecorder()
                app.state.bus.listeners.append(recorder)
                async with httpx.AsyncClient(
                    base_url=url, headers=tokens.headers(), timeout=30
                ) as client:
                    yield Stack(app, url, client, provider, recorder, names, broker_url, probe)
    finally:
        probe_queue = f"{names.prefix}probe.billing"
        await delete_prefixed(broker_url, names, [probe_queue, *queues])
