from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tributary.email.api import router
from tributary.email.handlers import Delivery, command_handlers, event_handlers
from tributary.email.mailer import Mailer
from tributary.email.settings import Settings
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    # no I/O here: aiosmtplib connects per email, when a handler sends
    mailer = Mailer(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
    delivery = Delivery(mailer=mailer, from_address=settings.smtp_from)
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
