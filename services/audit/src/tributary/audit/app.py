from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from fastapi import FastAPI

from tributary.audit.api import router
from tributary.audit.checkpoints import Signer, checkpoint_periodically, load_signing_key
from tributary.audit.handlers import Checkpointing, build_handlers
from tributary.audit.roles import grant_app_role
from tributary.audit.settings import Settings
from tributary.audit.ui import router as ui_router
from tributary.messaging.bus import Bus
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.uow import UnitOfWork
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    signer = Signer(load_signing_key(settings))

    async def startup(stack: AsyncExitStack, app: FastAPI) -> None:
        if settings.app_role is not None:  # after the migrations, as the tables' owner
            await grant_app_role(
                settings.migration_database_url or settings.database_url, settings.app_role
            )
        app.state.signer = signer
        app.state.audit_settings = settings
        app.state.verified = None  # the last checkpoint /audit/verify found the chain reaches

        def unit_of_work() -> UnitOfWork | None:  # the bus starts after this hook
            bus: Bus | None = getattr(app.state, "bus", None)
            return bus.unit_of_work() if bus is not None else None

        task = asyncio.create_task(
            checkpoint_periodically(unit_of_work, signer, settings.checkpoint_seconds)
        )

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        stack.push_async_callback(stop)

    return build(
        ServiceSpec(
            name="audit",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[router, ui_router],
            handlers=build_handlers(
                settings.pii_key_bytes, Checkpointing(signer, settings.checkpoint_every)
            ),
            startup=startup,
            messaging=messaging,
            description="An append-only, hash-chained, PII-masked record of every event.",
        )
    )
