from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import event

from tributary.email.api import router
from tributary.email.handlers import (
    DEVELOPMENT_ADDRESS_KEY,
    Delivery,
    command_handlers,
    event_handlers,
)
from tributary.email.mailer import Mailer
from tributary.email.settings import DEFAULT_CONCURRENCY, Settings
from tributary.messaging.db import create_engine, is_sqlite, session_factory
from tributary.messaging.settings import MessagingSettings
from tributary.observability.tracing import instrument_engine
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build

log = logging.getLogger("tributary.email")


def _claims_skip_sync(dbapi_connection: Any, _record: Any) -> None:
    """A claim's commit need not reach the disk before SMTP: lost with the machine (a process
    crash loses nothing in WAL mode), its mail is at worst sent again with the same Message-ID,
    as when the handler's commit is lost; and the ``sent`` commit that follows (synchronous as
    configured) syncs the log with the claim in it. One disk sync per mail instead of two."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def consumer_settings(settings: Settings, messaging: MessagingSettings) -> MessagingSettings:
    """The runtime's settings with the email service's concurrency: ``EMAIL_CONCURRENCY``,
    else ``TRIBUTARY_CONCURRENCY`` (or ``concurrency`` given) when set, else the default."""
    if settings.concurrency is not None:
        chosen = settings.concurrency
    elif "concurrency" in messaging.model_fields_set:
        return messaging
    else:
        chosen = DEFAULT_CONCURRENCY
    return messaging.model_copy(update={"concurrency": chosen})


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    # no I/O here: the pool connects when a handler first sends
    mailer = Mailer(
        settings.smtp_host,
        settings.smtp_port,
        timeout=settings.smtp_timeout,
        connections=settings.smtp_connections,
        max_messages=settings.smtp_max_messages,
    )
    key = settings.address_key.get_secret_value().encode() if settings.address_key else b""
    if not key:
        log.warning("EMAIL_ADDRESS_KEY is not set: address hashes use a development key")
        key = DEVELOPMENT_ADDRESS_KEY
    delivery = Delivery(
        mailer=mailer,
        from_address=settings.smtp_from,
        address_key=key,
        welcome_window=timedelta(hours=settings.welcome_window_hours),
        claim_lease=timedelta(seconds=settings.claim_lease),
    )
    messaging = consumer_settings(settings, messaging or MessagingSettings())
    workers = messaging.concurrency

    async def startup(stack: AsyncExitStack, app: FastAPI) -> None:
        # claims commit on connections of their own: a handler's transaction holds one of the
        # main pool's connections while it waits for its claim, so sharing that pool could
        # leave every connection held by a handler waiting for another
        engine = create_engine(settings.database_url, pool_size=workers + 2, max_overflow=workers)
        if is_sqlite(engine):
            event.listen(engine.sync_engine, "connect", _claims_skip_sync)
        instrument_engine(engine)
        stack.push_async_callback(mailer.close)  # after the consumers stopped (exit stack order)
        stack.push_async_callback(engine.dispose)
        stack.callback(delivery.claims.bind, None)
        delivery.claims.bind(session_factory(engine))

    return build(
        ServiceSpec(
            name="email",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[router],
            handlers=event_handlers(delivery),
            commands=command_handlers(delivery),
            messaging=messaging,
            startup=startup,
            description=(
                "Sends welcome, subscription and requested emails over SMTP, never the same "
                "logical email twice (a crash between send and commit resends it with the "
                "same Message-ID)."
            ),
        )
    )
