"""The payment provider's app: its own database, API, and the background webhook sender.

It stands in for an external provider, so it shares nothing with the services but the
building blocks (problem details, body limit, migrations): no broker, no outbox, no tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from tributary.messaging.db import create_engine, session_factory
from tributary.payment_provider import ledger
from tributary.payment_provider.api import merchant, payer
from tributary.payment_provider.settings import (
    DEVELOPMENT_API_KEY,
    DEVELOPMENT_WEBHOOK_SECRET,
    Settings,
)
from tributary.payment_provider.webhooks import Sender
from tributary.service import limits, migrations, problems

log = logging.getLogger("tributary.payment_provider")

MIGRATIONS = Path(__file__).parent / "migrations"


def api_keys(settings: Settings) -> list[bytes]:
    keys = [k.get_secret_value().encode() for k in settings.api_keys if k.get_secret_value()]
    return keys or [DEVELOPMENT_API_KEY.encode()]


def webhook_secret(settings: Settings) -> str:
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        return DEVELOPMENT_WEBHOOK_SECRET
    return settings.webhook_secret.get_secret_value()


def _warn_about_defaults(settings: Settings) -> None:
    if api_keys(settings) == [DEVELOPMENT_API_KEY.encode()]:
        log.warning("PAYMENT_PROVIDER_API_KEYS is not set: the public development key is accepted")
    if webhook_secret(settings) == DEVELOPMENT_WEBHOOK_SECRET:
        log.warning(
            "PAYMENT_PROVIDER_WEBHOOK_SECRET is not set: webhooks are signed with the public "
            "development secret"
        )
    if not settings.webhook_url:
        log.warning("PAYMENT_PROVIDER_WEBHOOK_URL is not set: webhooks are recorded, not sent")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    secret = webhook_secret(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            _warn_about_defaults(settings)
            owner_url = settings.migration_database_url or settings.database_url
            await migrations.upgrade(MIGRATIONS, owner_url)
            engine = create_engine(settings.database_url)
            stack.push_async_callback(engine.dispose)
            sessions = session_factory(engine)
            app.state.engine = engine
            app.state.sessions = sessions

            async def settle() -> None:
                async with sessions() as session:
                    await ledger.settle_due(session)

            sender = Sender(
                sessions,
                url=settings.webhook_url or None,
                secret=secret,
                retry_seconds=settings.webhook_retry_seconds,
                timeout_seconds=settings.webhook_timeout_seconds,
                poll_seconds=settings.poll_seconds,
                settle=settle,
            )
            stack.push_async_callback(sender.aclose)
            app.state.sender = sender
            task = asyncio.create_task(sender.run(), name="payment-provider-webhooks")
            app.state.sender_task = task

            async def stop() -> None:
                sender.stop()
                await task

            stack.push_async_callback(stop)
            log.info("payment provider ready")
            yield

    app = FastAPI(
        title="Tributary payment provider",
        description=(
            "A stand-in for an external payment provider: checkouts, payments (succeed, "
            "decline, delay), refunds, and Standard Webhooks-signed webhooks with retries."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = api_keys(settings)
    app.state.webhook_secret = secret
    limits.install(app)
    problems.install(app)
    app.include_router(health())
    app.include_router(merchant)
    app.include_router(payer)
    return app


def health() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/health/ready", response_model=None)
    async def ready(request: Request) -> JSONResponse:
        """The database answers and the webhook sender runs."""
        reasons: dict[str, str] = {}
        engine = getattr(request.app.state, "engine", None)
        if engine is None:
            reasons["database"] = "starting"
        else:
            try:
                async with asyncio.timeout(5), engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            except Exception as exc:
                reasons["database"] = type(exc).__name__
        task = getattr(request.app.state, "sender_task", None)
        if task is None or task.done():
            reasons["webhooks"] = "the webhook sender is not running"
        body = {"status": "not ready" if reasons else "ready", "reasons": reasons}
        return JSONResponse(body, status_code=503 if reasons else 200)

    return router
