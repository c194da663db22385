"""The notification app running in-process on the real broker, with a probe for its commands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import httpx
from fastapi import FastAPI

from tributary.contracts.envelope import CloudEvent, parse_event
from tributary.messaging.testing import (
    OutcomeRecorder,
    delete_prefixed,
    isolated_settings,
    publish_raw,
    read_queue,
)
from tributary.messaging.topology import Names
from tributary.notification.app import create_app
from tributary.notification.settings import Settings
from tributary.service.testing import TokenMinter, minter, running

KEY = "test-unsubscribe-key"
PUBLIC_URL = "https://notify.example.com"


def routing_key(event: CloudEvent[Any]) -> str:
    return event.type.removeprefix("com.tributary.")


@dataclass
class NotificationService:
    app: FastAPI
    client: httpx.AsyncClient
    """Calls as an admin."""
    recorder: OutcomeRecorder
    names: Names
    broker_url: str
    probe: str
    """A queue bound to ``email.send.#``: the commands the service sends, as the broker has them."""

    @property
    def tokens(self) -> TokenMinter:
        return minter(self.app)

    async def publish(self, event: CloudEvent[Any], *, times: int = 1) -> None:
        for _ in range(times):
            await publish_raw(self.broker_url, self.names, routing_key(event), event.to_bytes())

    async def handled(self, event: CloudEvent[Any], times: int = 1) -> None:
        await self.recorder.wait(
            lambda: len(self.recorder.of(event.id)) >= times, what=f"{event.id} x{times}"
        )

    async def deliver(self, *events: CloudEvent[Any]) -> None:
        """Publish each event and wait until it is handled."""
        for event in events:
            await self.publish(event)
        for event in events:
            await self.handled(event)

    async def commands(self, expect: int) -> list[dict[str, Any]]:
        found = await read_queue(self.broker_url, self.probe, expect=expect)
        return [parse_event(m.body).data for m in found]


def settings_for(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "NOTIFICATION_DATABASE_URL": database_url,
        "NOTIFICATION_PORT": 0,
        "NOTIFICATION_PUBLIC_URL": PUBLIC_URL,
        "NOTIFICATION_UNSUBSCRIBE_KEY": KEY,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@asynccontextmanager
async def probed(app: FastAPI, broker_url: str) -> AsyncIterator[str]:
    """Bind a probe queue to the commands ``app`` sends; delete every queue after."""
    bus_settings = app.state.bus.settings
    names = Names(bus_settings.name_prefix)
    probe = f"{names.prefix}probe.email.send"
    connection = await aio_pika.connect(broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(probe)
        await queue.bind(names.exchange, "email.send.#")
    try:
        yield probe
    finally:
        # every queue the bus declared, command queues included (a leaked quorum queue keeps
        # file handles on the broker, which refuses connections once they run out)
        await delete_prefixed(broker_url, names, [probe, *app.state.bus.queue_names()])


@asynccontextmanager
async def notification_service(
    database_url: str, broker_url: str, **settings: Any
) -> AsyncIterator[NotificationService]:
    messaging = isolated_settings(broker_url)
    app = create_app(settings_for(database_url, **settings), messaging)
    recorder = OutcomeRecorder()
    async with running(app) as client:
        app.state.bus.listeners.append(recorder)
        async with probed(app, broker_url) as probe:
            yield NotificationService(
                app, client, recorder, Names(messaging.name_prefix), broker_url, probe
            )
