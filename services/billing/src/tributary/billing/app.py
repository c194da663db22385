from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook

from tributary.billing import api, webhooks
from tributary.billing.commands import Billing
from tributary.billing.events import CURRENT_VERSIONS
from tributary.billing.eventstore import EventStore
from tributary.billing.handlers import SagaHandlers, command_handlers, event_handlers
from tributary.billing.metrics import BillingMetrics
from tributary.billing.projections import Projector
from tributary.billing.provider import ProviderClient
from tributary.billing.settings import (
    DEVELOPMENT_PROVIDER_API_KEY,
    DEVELOPMENT_WEBHOOK_SECRET,
    Settings,
)
from tributary.billing.upcasting import UPCASTERS
from tributary.messaging.settings import MessagingSettings
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build

log = logging.getLogger("tributary.billing")


def webhook_secrets(settings: Settings) -> list[str]:
    found = [s.get_secret_value() for s in settings.webhook_secrets if s.get_secret_value()]
    return found or [DEVELOPMENT_WEBHOOK_SECRET]


def provider_api_key(settings: Settings) -> str:
    key = settings.provider_api_key.get_secret_value() if settings.provider_api_key else ""
    return key or DEVELOPMENT_PROVIDER_API_KEY


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    metrics = BillingMetrics()
    store = EventStore(UPCASTERS, CURRENT_VERSIONS)
    billing = Billing(
        store,
        Projector(store),
        metrics,
        retries=settings.command_retries,
        activation_timeout=timedelta(seconds=settings.activation_timeout_seconds),
    )
    # a malformed secret stops the service here, naming no value
    try:
        signers = [Webhook(secret) for secret in webhook_secrets(settings)]
    except Exception:
        raise ValueError("BILLING_WEBHOOK_SECRETS: a secret is not whsec_<base64>") from None
    receiver = webhooks.Receiver(billing, metrics, signers, settings.webhook_max_bytes)
    started: list[FastAPI] = []

    def provider() -> ProviderClient:
        """The provider client of the running app (made at start-up, see below)."""
        client: ProviderClient = started[0].state.provider
        return client

    saga = SagaHandlers(billing, metrics, provider)

    async def startup(stack: AsyncExitStack, app: FastAPI) -> None:
        if webhook_secrets(settings) == [DEVELOPMENT_WEBHOOK_SECRET]:
            log.warning("BILLING_WEBHOOK_SECRETS is not set: the development secret is accepted")
        if provider_api_key(settings) == DEVELOPMENT_PROVIDER_API_KEY:
            log.warning("BILLING_PROVIDER_API_KEY is not set: the provider's development key")
        client = ProviderClient(
            settings.provider_url, provider_api_key(settings), settings.provider_timeout_seconds
        )
        stack.push_async_callback(client.aclose)
        app.state.provider = client
        started[:] = [app]
        # a projection added since the last start (or left behind) catches up before
        # anything is appended or read
        async with app.state.sessions() as session:
            applied = await billing.projector.catch_up(session)
            await session.commit()
        if applied:
            log.info("projections caught up: %d event application(s)", applied)

    app = build(
        ServiceSpec(
            name="billing",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[api.router, webhooks.router()],
            handlers=event_handlers(billing, metrics, saga),
            commands=command_handlers(saga),
            messaging=messaging,
            startup=startup,
            description=(
                "Paid plans: subscriptions as event-sourced aggregates, checkouts at the payment "
                "provider, its signed webhooks, and read models projected from the events."
            ),
            collectors=metrics.collectors,
        )
    )
    app.add_middleware(webhooks.CountRefusedBodies, metrics=metrics)
    app.state.billing = billing
    app.state.webhooks = receiver
    app.state.billing_metrics = metrics
    app.state.billing_settings = settings
    return app
