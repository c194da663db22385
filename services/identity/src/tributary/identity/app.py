from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tributary.identity import api, api_keys
from tributary.identity.handlers import HANDLERS
from tributary.identity.settings import Settings
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    return build(
        ServiceSpec(
            name="identity",
            settings=settings or Settings(),
            migrations=Path(__file__).parent / "migrations",
            routers=[api.router, api_keys.router],
            handlers=HANDLERS,
            messaging=messaging,
            description="Users, roles, plans and API keys; activates paid plans on payment.",
        )
    )
