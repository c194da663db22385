from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlmodel import col, select

from tributary.contracts.envelope import new_event, parse_event
from tributary.contracts.events import UserCreatedV1
from tributary.email.app import create_app
from tributary.email.models import message_id_for
from tributary.email.settings import Settings
from tributary.messaging.db import OutboxRow
from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
    read_queue,
)
from tributary.messaging.topology import Names
from tributary.observability.tracing import setup_tracing
from tributary.service.testing import running
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .smtp_server import Mailbox, free_port, smtp_server
from .test_handlers import email_send, subscription_activated, user_created


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: an SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'email.db'}"
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"t_email_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(server.url, name)
    yield url
    await drop_postgres_database(server.url, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'email.db'}"


@dataclass
class EmailService:
    app: FastAPI
    client: httpx.AsyncClient
    recorder: OutcomeRecorder
    names: Names
    broker_url: str
    probe: str
    """A queue bound to ``email.#``: the events the service emits, as they reach the broker."""

    async def publish(self, routing_key: str, event: Any) -> None:
        await publish_raw(self.broker_url, self.names, routing_key, event.to_bytes())

    async def emitted(self, expect: int = 1) -> list[dict[str, Any]]:
        found = await read_queue(self.broker_url, self.probe, expect=expect)
        return [parse_event(m.body).to_dict() for m in found]

    async def outbox_types(self) -> list[str]:
        async with self.app.state.sessions() as session:
            rows = await session.exec(select(OutboxRow.routing_key).order_by(col(OutboxRow.seq)))
            return list(rows.all())


@asynccontextmanager
async def email_service(
    database_url: str, rabbitmq: Found, smtp_port: int, **messaging: Any
) -> AsyncIterator[EmailService]:
    settings = isolated_settings(rabbitmq.url, **messaging)
    names = Names(settings.name_prefix)
    probe = f"{names.prefix}probe"
    app = create_app(
        Settings(database_url=database_url, port=0, smtp_port=smtp_port, smtp_timeout=5),
        settings,
    )
    recorder = OutcomeRecorder()
    try:
        async with httpx_app(app) as client:
            app.state.bus.listeners.append(recorder)
            connection = await aio_pika.connect(rabbitmq.url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(probe)
                await queue.bind(names.exchange, "email.#")
            yield EmailService(app, client, recorder, names, rabbitmq.url, probe)
    finally:
        tiers = len(settings.retry_tiers)
        events = names.service_queues("email", tiers)
        commands = names.command_queues("email.send", tiers)
        queues = [probe, events.work, events.dlq, *events.retries]
        queues += [commands.work, commands.dlq, *commands.retries]
        await delete_prefixed(rabbitmq.url, names, queues)


@asynccontextmanager
async def httpx_app(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as client:
        assert (await client.get("/health/ready")).json()["status"] == "ready"
        yield client


async def test_a_sign_up_is_mailed_once_and_shows_up_in_the_api(
    database_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port, email_service(database_url, rabbitmq, port) as svc:
        event = user_created("usr_api0000001", email="ada.api@example.com")
        await svc.publish("user.created.v2", event)
        await svc.recorder.wait_until_handled(event.id)

        [mail] = mailbox.messages
        assert mail["To"] == "ada.api@example.com"
        assert mail["Message-ID"] == message_id_for("welcome:usr_api0000001")
        assert await svc.outbox_types() == ["email.sent.v1"]
        [sent] = await svc.emitted()
        assert sent["type"] == "com.tributary.email.sent.v1"
        assert sent["causationid"] == event.id
        assert sent["data"]["message_id"] == mail["Message-ID"]

        found = (await svc.client.get("/emails", params={"to": "ada.api@example.com"})).json()
        assert [(e["template"], e["status"]) for e in found] == [("welcome", "sent")]
        one = await svc.client.get(f"/emails/{found[0]['id']}")
        assert one.json()["message_id"] == mail["Message-ID"]
        assert (await svc.client.get("/emails", params={"to": "x@example.com"})).json() == []
        missing = await svc.client.get("/emails/eml_nope00000")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["detail"] == "There is no email eml_nope00000."
        assert missing.json()["errors"][0]["field"] == "path.email_id"
        no_to = await svc.client.get("/emails")
        assert no_to.status_code == 422
        assert no_to.json()["errors"][0]["field"] == "query.to"


async def test_the_same_sign_up_delivered_five_times_sends_one_mail(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port, email_service(sqlite_url, rabbitmq, port) as svc:
        event = user_created("usr_api0000002", email="five@example.com")
        for _ in range(5):
            await svc.publish("user.created.v2", event)
        await svc.recorder.wait_until_handled(event.id, "duplicate", times=4)
        # the same user announced again as v1, under another event id: still one welcome
        v1 = new_event(
            routing_key="user.created.v1",
            source="/services/identity",
            data=UserCreatedV1(
                user_id="usr_api0000002",
                email="five@example.com",
                name="Ada Lovelace",
                plan="free",
                locale="en-GB",
                created_at=datetime.now(UTC),
            ),
        )
        await svc.publish("user.created.v1", v1)
        await svc.recorder.wait_until_handled(v1.id)

        assert len(svc.recorder.of(event.id, "processed")) == 1
        assert len(mailbox.to("five@example.com")) == 1
        assert await svc.outbox_types() == ["email.sent.v1"]


async def test_a_mail_waits_out_an_smtp_outage_and_arrives_once(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox()
    port = free_port()  # nothing listens here yet
    async with email_service(sqlite_url, rabbitmq, port, retry_tiers=(0.5, 5.0, 15.0)) as svc:
        event = user_created("usr_api0000003", email="outage@example.com")
        await svc.publish("user.created.v2", event)
        await svc.recorder.wait_until_handled(event.id, "retried")

        async with smtp_server(mailbox, port):
            await svc.recorder.wait_until_handled(event.id)

        assert len(mailbox.to("outage@example.com")) == 1
        found = (await svc.client.get("/emails", params={"to": "outage@example.com"})).json()
        assert [e["status"] for e in found] == ["sent"]


async def test_a_451_reply_is_retried_until_the_server_takes_the_mail(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox(defer=4)  # more than the in-process attempts: a delayed retry too
    async with smtp_server(mailbox) as port, email_service(sqlite_url, rabbitmq, port) as svc:
        event = user_created("usr_api0000004", email="deferred@example.com")
        await svc.publish("user.created.v2", event)
        await svc.recorder.wait_until_handled(event.id)

        assert svc.recorder.of(event.id, "retried")
        assert mailbox.rcpt_attempts == 5
        assert len(mailbox.to("deferred@example.com")) == 1


async def test_a_550_reply_emits_email_failed_and_sends_nothing(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox(refuse=frozenset({"nobody@example.com"}))
    async with smtp_server(mailbox) as port, email_service(sqlite_url, rabbitmq, port) as svc:
        event = user_created("usr_api0000005", email="nobody@example.com")
        await svc.publish("user.created.v2", event)
        await svc.recorder.wait_until_handled(event.id)  # handled: a permanent failure

        assert mailbox.messages == []
        [failed] = await svc.emitted()
        assert failed["type"] == "com.tributary.email.failed.v1"
        assert failed["data"]["permanent"] is True
        assert failed["data"]["reason"].startswith("550 5.1.1")
        found = (await svc.client.get("/emails", params={"to": "nobody@example.com"})).json()
        assert [(e["status"], e["sent_at"]) for e in found] == [("failed", None)]


async def test_an_email_send_command_is_consumed_from_its_queue_and_sent(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port, email_service(sqlite_url, rabbitmq, port) as svc:
        command = email_send(to="command@example.com")
        await svc.publish("email.send.v1", command)
        [record] = await svc.recorder.wait_until_handled(command.id)

        assert record.consumer == "email.send"
        [mail] = mailbox.to("command@example.com")
        assert mail["Subject"] == "Grace mentioned you"
        assert mail["Message-ID"] == message_id_for(f"send:{command.data.request_id}")


async def test_subscription_activated_after_sign_up_mails_the_subscriber(
    sqlite_url: str, rabbitmq: Found
) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port, email_service(sqlite_url, rabbitmq, port) as svc:
        signed_up = user_created("usr_api0000006", email="payer@example.com", locale="de-DE")
        await svc.publish("user.created.v2", signed_up)
        await svc.recorder.wait_until_handled(signed_up.id)
        activated = subscription_activated("usr_api0000006")
        await svc.publish("subscription.activated.v1", activated)
        await svc.recorder.wait_until_handled(activated.id)

        _welcome, subscribed = mailbox.to("payer@example.com")
        assert subscribed["Subject"] == "Ihr Tributary-Tarif pro ist aktiv"


async def test_the_address_asked_for_stays_out_of_the_request_span(
    sqlite_url: str, rabbitmq: Found
) -> None:
    provider = setup_tracing("email")  # what create_app does; returns the installed provider
    if provider is None:
        pytest.fail("tracing is disabled (OTEL_SDK_DISABLED): cannot look at spans")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        async with email_service(sqlite_url, rabbitmq, free_port()) as svc:
            response = await svc.client.get("/emails", params={"to": "secret.ada@example.com"})
            assert response.status_code == 200
        attributes = [dict(span.attributes or {}) for span in exporter.get_finished_spans()]
        assert attributes, "no spans recorded"
        text = json.dumps(attributes, default=str)
        assert "/emails" in text
        assert "secret.ada" not in text
    finally:
        exporter.shutdown()
