from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tributary.audit.api import router
from tributary.audit.handlers import build_handlers
from tributary.audit.settings import Settings
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    return build(
        ServiceSpec(
            name="audit",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[router],
            handlers=build_handlers(settings.pii_key_bytes),
            messaging=messaging,
            description="An append-only, hash-chained, PII-masked record of every event.",
        )
    )
