"""Builders for the eventctl integration tests: events, a running bus, the CLI, queue depths."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from libs.contracts.tests.samples import sample
from tributary.contracts.catalog import NAMESPACE
from tributary.contracts.envelope import CloudEvent
from tributary.contracts.events import UserCreatedV2
from tributary.eventctl.cli import main_async
from tributary.messaging import context
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import (
    publish_raw,
    queue_depth,
)
from tributary.messaging.topology import Names
from tributary.messaging.uow import UnitOfWork
from tributary.testkit.waiting import eventually

UserCreated = CloudEvent[UserCreatedV2]


def user_created(**data: Any) -> dict[str, Any]:
    """A valid ``user.created.v2`` CloudEvent as a foreign producer would send it."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": f"{NAMESPACE}.user.created.v2",
        "source": "/external/test-producer",
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": uuid.uuid4().hex,
        "data": sample("user.created.v2", **data),
    }


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


async def publish(settings: MessagingSettings, event: dict[str, Any]) -> None:
    routing_key = str(event["type"]).removeprefix(f"{NAMESPACE}.")
    await publish_raw(
        settings.rabbitmq_url,
        Names(settings.name_prefix),
        routing_key,
        body_of(event),
        message_id=str(event["id"]),
    )


@dataclass
class Call:
    event_id: str
    is_replay: bool
    attempt: int


@dataclass
class Handler:
    """A ``user.created`` handler whose failure the test switches: None, or an exception."""

    failure: BaseException | None = None
    calls: list[Call] = field(default_factory=list)

    async def __call__(self, event: UserCreated, uow: UnitOfWork) -> None:
        self.calls.append(Call(event.id, uow.is_replay, context.current().attempt))
        if self.failure is not None:
            raise self.failure

    def of(self, event_id: str) -> list[Call]:
        return [c for c in self.calls if c.event_id == event_id]


async def eventctl(settings: MessagingSettings, *argv: str) -> int:
    """Run the CLI against the test's broker and name prefix."""
    return await main_async(
        [*argv, "--url", settings.rabbitmq_url, "--prefix", settings.name_prefix]
    )


def listed(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The JSON lines ``dlq list --json`` printed."""
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


async def messages_in(url: str, queue: str) -> int:
    """Messages ready in ``queue``, from a ``basic.get`` (the message goes back at once).

    A passive declare's count of a quorum queue lags behind recent requeues (it reads 0
    while messages are there); the count in a ``get-ok`` does not. The get counts as a
    delivery, so not for a queue whose delivery limit the test relies on.
    """
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        first = await q.get(no_ack=False, fail=False)
        return 0 if first is None else int(first.message_count or 0) + 1


async def wait_for_depth(url: str, queue: str, depth: int, *, timeout: float = 20.0) -> None:
    """Poll a passive declare until ``queue`` holds ``depth`` messages; takes nothing."""

    async def reached() -> bool:
        return await queue_depth(url, queue) == depth

    await eventually(reached, timeout=timeout, what=f"{depth} ready messages in {queue}")
