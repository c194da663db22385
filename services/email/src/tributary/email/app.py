from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from tributary.email.api import router
from tributary.email.handlers import (
    DEVELOPMENT_ADDRESS_KEY,
    Delivery,
    command_handlers,
    event_handlers,
)
from tributary.email.mailer import Mailer
from tributary.email.settings import Settings
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build

log = logging.getLogger("tributary.email")


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    # no I/O here: aiosmtplib connects per email, when a handler sends
    mailer = Mailer(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
    key = settings.address_key.get_secret_value().encode() if settings.address_key else b""
    if not key:
        log.warning("EMAIL_ADDRESS_KEY is not set: address hashes use a development key")
        key = DEVELOPMENT_ADDRESS_KEY
    delivery = Delivery(
        mailer=mailer,
        from_address=settings.smtp_from,
        address_key=key,
        welcome_window=timedelta(hours=settings.welcome_window_hours),
    )
    return build(
        ServiceSpec(
            name="email",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[router],
            handlers=event_handlers(delivery),
            commands=command_handlers(delivery),
            messaging=messaging,
            description=(
                "Sends welcome, subscription and requested emails over SMTP, never the same "
                "logical email twice (a crash between send and commit resends it with the "
                "same Message-ID)."
            ),
        )
    )
