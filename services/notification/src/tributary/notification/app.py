from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path

from fastapi import FastAPI

from tributary.messaging.settings import MessagingSettings
from tributary.notification import api, stream, unsubscribe, webhook_api
from tributary.notification.channels import Dispatcher, Email, InApp, UnsubscribeLinks
from tributary.notification.digest import Digests
from tributary.notification.handlers import event_handlers
from tributary.notification.jobs import Jobs
from tributary.notification.metrics import NotificationMetrics
from tributary.notification.quiet import QuietHours
from tributary.notification.settings import Settings
from tributary.notification.streams import Streams
from tributary.notification.tokens import DEVELOPMENT_UNSUBSCRIBE_KEY
from tributary.notification.webhooks import Webhooks
from tributary.service.app import ServiceSpec
from tributary.service.app import create_app as build

log = logging.getLogger("tributary.notification")


def unsubscribe_key(settings: Settings) -> bytes:
    key = settings.unsubscribe_key.get_secret_value().encode() if settings.unsubscribe_key else b""
    if not key:
        log.warning(
            "NOTIFICATION_UNSUBSCRIBE_KEY is not set: unsubscribe links are signed with a "
            "development key"
        )
        return DEVELOPMENT_UNSUBSCRIBE_KEY
    return key


def create_app(
    settings: Settings | None = None, messaging: MessagingSettings | None = None
) -> FastAPI:
    settings = settings or Settings()
    key = unsubscribe_key(settings)
    streams = Streams(per_user=settings.sse_streams_per_user)
    links = UnsubscribeLinks(
        public_url=settings.public_url,
        key=key,
        ttl_seconds=settings.unsubscribe_ttl_days * 86400,
    )
    jobs = Jobs()  # deferred work; each feature registers its job kinds here
    in_app = InApp(streams)
    webhooks = Webhooks(settings, jobs, in_app)  # registers the webhook_attempt job
    metrics = NotificationMetrics()
    quiet = QuietHours(metrics)  # holds what arrives in quiet hours for every channel but in-app
    digests = Digests(settings.digest_window_seconds, metrics)  # mentions' email, one per window
    dispatcher = Dispatcher(
        [in_app, Email(links), webhooks.channel], holder=quiet, collector=digests
    )
    jobs.register("deliver", quiet.job(dispatcher))
    jobs.register("digest", digests.job(dispatcher))

    async def startup(stack: AsyncExitStack, app: FastAPI) -> None:
        streams.open()
        stack.push_async_callback(streams.aclose)  # streams end before the engine goes

    app = build(
        ServiceSpec(
            name="notification",
            settings=settings,
            migrations=Path(__file__).parent / "migrations",
            routers=[api.router, stream.router, unsubscribe.router, webhook_api.router],
            handlers=event_handlers(dispatcher),
            commands=jobs.command_handlers(),
            messaging=messaging,
            startup=startup,
            collectors=[webhooks.metrics, *metrics.collectors()],
            description=(
                "Notifies users of what happened to them -- in-app (with a live stream) and by "
                "email through the email.send command -- as their per-category preferences say."
            ),
        )
    )
    app.state.streams = streams
    app.state.jobs = jobs
    app.state.webhooks = webhooks
    app.state.dispatcher = dispatcher
    app.state.notification_settings = settings
    app.state.unsubscribe_key = key
    return app
