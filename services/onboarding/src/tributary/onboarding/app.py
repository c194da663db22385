from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tributary.messaging.settings import MessagingSettings
from tributary.onboarding.api import router
from tributary.onboarding.handlers import HANDLERS
from tributary.onboarding.settings import Settings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    return build(
        ServiceSpec(
            name="onboarding",
            settings=settings or Settings(),
            migrations=Path(__file__).parent / "migrations",
            routers=[router],
            handlers=HANDLERS,
            messaging=messaging,
            description="Creates exactly one workspace per new user.",
        )
    )
