"""The webhook channel: signed deliveries to the endpoints users registered, retried on a
schedule, endpoints disabled when they are gone or keep failing.

* **One delivery per notification and endpoint.** The channel makes a ``webhook_deliveries``
  row per (source, endpoint) -- unique -- for every enabled endpoint of the user whose category
  filter takes the notification, and stages its first attempt as a ``webhook_attempt`` job
  (:mod:`~tributary.notification.jobs`). The notification's transaction never waits on HTTP;
  a redelivered or re-announced notification finds its deliveries made. A replay (not forced)
  makes none: webhooks are irreversible.
* **Attempts are jobs.** The HTTP call happens in the job's handler, before it writes anything
  (so no lock is held while the endpoint answers). Each attempt is recorded (time, status or
  error, duration); a failed one stages the next at the time the schedule says
  (``NOTIFICATION_WEBHOOK_RETRY_SCHEDULE``) as a scheduled outbox row, so a restart loses
  nothing. An HTTP failure never raises: the runtime's own retries are for faults of the
  database or broker. A job that arrives twice finds its attempt made (unique per delivery and
  job); a replayed job never calls the endpoint.
* **Signed per the Standard Webhooks spec** (``standardwebhooks``): ``webhook-id`` (the
  delivery's id, the same on every attempt and re-send), ``webhook-timestamp`` and
  ``webhook-signature``; during a secret rotation, two signatures (new and old secret).
* **Success** is a 2xx within ``NOTIFICATION_WEBHOOK_TIMEOUT_SECONDS``; redirects are not
  followed (a 3xx is a failure). ``410 Gone`` disables the endpoint at once; an endpoint that
  has had no success for ``NOTIFICATION_WEBHOOK_DISABLE_AFTER_SECONDS`` is disabled on its
  next failure. Either way its pending deliveries end (``failed``) and the user gets an in-app
  notification (``account``, deduplicated per endpoint and failure spell). A disabled endpoint
  gets nothing until the user enables it again, which restarts its failure clock.
* **Where requests may go**: see :mod:`~tributary.notification.webhook_urls` (checked at
  registration and again at every attempt, the checked address is the one connected to).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from sqlalchemy import delete, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook

from tributary.contracts.events import NotificationJobV1
from tributary.messaging import context
from tributary.messaging.db import as_utc, now
from tributary.messaging.errors import PermanentError
from tributary.messaging.uow import UnitOfWork
from tributary.notification.channels import Channel, Notice
from tributary.notification.jobs import Jobs
from tributary.notification.models import Notification
from tributary.notification.preferences import CATEGORIES, Category, ChannelName
from tributary.notification.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tributary.notification.webhook_settings import WebhookSettings
from tributary.notification.webhook_urls import (
    Policy,
    Refused,
    Resolver,
    system_resolver,
    vet,
)

log = logging.getLogger("tributary.notification.webhooks")

JOB = "webhook_attempt"
EVENT_TYPE = "notification.created"
USER_AGENT = "Tributary-Webhooks/1.0"
_NOTIFICATION_IDS = uuid.UUID("0d5f3c1e-8a47-4c59-b3f2-6e7a9d21c804")
_JOB_REF = re.compile(r"(msg_[A-Za-z0-9]{8,40}):([1-9][0-9]{0,2}|r[1-9][0-9]{0,5})")
DisableReason = Literal["gone", "failing", "user"]


def new_endpoint_id() -> str:
    return f"wh_{secrets.token_hex(12)}"


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def new_secret() -> str:
    """``whsec_`` and 32 random bytes, base64: a Standard Webhooks secret."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def notification_id(user_id: str, source: str) -> str:
    """The notification's id in webhook bodies: the same for one user and source, whichever
    channels delivered it (the in-app id, when there is one, is ``inbox_id``)."""
    return "ntf_" + uuid.uuid5(_NOTIFICATION_IDS, f"{user_id}|{source}").hex


def categories_of(endpoint: WebhookEndpoint) -> list[Category] | None:
    if endpoint.categories is None:
        return None
    return [c for c in CATEGORIES if c in endpoint.categories.split(",")]


def accepts(endpoint: WebhookEndpoint, category: Category) -> bool:
    wanted = categories_of(endpoint)
    return wanted is None or category in wanted


def signing_secrets(endpoint: WebhookEndpoint, at: datetime) -> list[str]:
    """The secrets that sign now: the current one, and the previous one during rotation."""
    found = [endpoint.secret]
    until = endpoint.previous_secret_until
    if endpoint.previous_secret and until is not None and as_utc(until) > at:
        found.append(endpoint.previous_secret)
    return found


def sign(message_id: str, timestamp: int, body: str, keys: Sequence[str]) -> str:
    """The ``webhook-signature`` header: ``v1,<base64>`` per secret, space-separated."""
    at = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(Webhook(key).sign(message_id, at, body) for key in keys)


def body_of(notice: Notice, inbox_id: int | None, at: datetime) -> str:
    """The JSON body of a notification's deliveries (exactly these bytes are signed)."""
    document = {
        "type": EVENT_TYPE,
        "timestamp": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "id": notification_id(notice.user_id, notice.source),
            "inbox_id": inbox_id,
            "category": notice.category,
            "urgent": notice.urgent,
            "title": notice.title,
            "body": notice.body,
            "url": notice.url,
        },
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


# -- metrics -----------------------------------------------------------------------------------


class WebhookMetrics:
    """Attempts by outcome, their duration, endpoints disabled: a collector to register with
    the service's registry (its ``/metrics``)."""

    def __init__(self, service: str = "notification") -> None:
        self.service = service
        self._registry = CollectorRegistry(auto_describe=True)
        self.attempts = Counter(
            "tributary_webhook_attempts",
            "Webhook delivery attempts by outcome: succeeded, http_status (not 2xx), gone "
            "(410), timeout, connect_error, forbidden_address, unresolvable, invalid_url, "
            "request_error",
            ["service", "outcome"],
            registry=self._registry,
        )
        self.duration = Histogram(
            "tributary_webhook_attempt_duration_seconds",
            "How long endpoints took to answer (attempts that made a request)",
            ["service"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
            registry=self._registry,
        )
        self.disabled = Counter(
            "tributary_webhook_endpoints_disabled",
            "Webhook endpoints disabled by the service: gone (410) or failing (no success for "
            "the disable period)",
            ["service", "reason"],
            registry=self._registry,
        )
        for reason in ("gone", "failing"):  # shown at 0 so an alert sees the first one's rise
            self.disabled.labels(service, reason)

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


# -- one HTTP attempt --------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    succeeded: bool
    status_code: int | None = None
    error: str | None = None
    detail: str | None = None
    duration_ms: int | None = None
    """None when no request was made (refused before connecting)."""

    @property
    def outcome(self) -> str:
        if self.succeeded:
            return "succeeded"
        if self.status_code == 410:
            return "gone"
        if self.status_code is not None:
            return "http_status"
        return self.error or "request_error"


class Sender:
    """POSTs a signed body to the checked address of an endpoint's URL."""

    def __init__(
        self,
        policy: Policy,
        *,
        timeout: float,
        resolver: Resolver = system_resolver,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.resolver = resolver
        self.tls = tls or httpx.create_ssl_context()

    async def send(self, url: str, message_id: str, body: str, keys: Sequence[str]) -> Result:
        started = time.perf_counter()
        called = False

        def elapsed() -> int | None:
            return round((time.perf_counter() - started) * 1000) if called else None

        try:
            async with asyncio.timeout(self.timeout):
                destination = await vet(url, self.policy, self.resolver)
                timestamp = int(time.time())
                headers = {
                    "host": destination.target.authority,
                    "content-type": "application/json",
                    "user-agent": USER_AGENT,
                    "webhook-id": message_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": sign(message_id, timestamp, body, keys),
                }
                extensions: dict[str, Any] = {}
                if destination.server_name is not None:
                    extensions["sni_hostname"] = destination.server_name
                async with httpx.AsyncClient(
                    verify=self.tls,
                    follow_redirects=False,
                    trust_env=False,  # no proxy from the environment: the checked address only
                    timeout=self.timeout,
                    limits=httpx.Limits(max_keepalive_connections=0),  # no connection reuse
                ) as client:
                    request = client.build_request(
                        "POST",
                        destination.url,
                        content=body.encode(),
                        headers=headers,
                        extensions=extensions,
                    )
                    called = True
                    response = await client.send(request, stream=True)
                    await response.aclose()  # the answer's body is not read
        except Refused as refused:
            return Result(False, error=refused.reason, detail=refused.message[:300])
        except (TimeoutError, httpx.TimeoutException):
            return Result(False, error="timeout", detail=None, duration_ms=elapsed())
        except (httpx.ConnectError, OSError) as exc:
            return Result(False, error="connect_error", detail=_brief(exc), duration_ms=elapsed())
        except (httpx.HTTPError, ValueError) as exc:  # protocol errors, a URL httpx refuses
            return Result(False, error="request_error", detail=_brief(exc), duration_ms=elapsed())
        code = response.status_code
        return Result(200 <= code < 300, status_code=code, duration_ms=elapsed())


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


# -- the channel -------------------------------------------------------------------------------


class WebhookChannel:
    """``webhook``: a delivery per enabled endpoint of the user that takes the category."""

    name: ChannelName = "webhook"

    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    async def deliver(self, notice: Notice, uow: UnitOfWork) -> None:
        if uow.suppress_side_effects:
            log.info("replayed delivery: %s webhooks not sent", notice.category)
            return
        await self.webhooks.stage(notice, uow)


# -- the service's webhook logic ---------------------------------------------------------------


class Webhooks:
    """Deliveries, attempts and the endpoints' lifecycle; the channel, the job handler and the
    API all go through it."""

    def __init__(
        self,
        settings: WebhookSettings,
        jobs: Jobs,
        in_app: Channel,
        *,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.schedule = tuple(float(s) for s in settings.webhook_retry_schedule)
        self.disable_after = timedelta(seconds=settings.webhook_disable_after_seconds)
        self.rotation = timedelta(seconds=settings.webhook_rotation_seconds)
        self.per_user = settings.webhook_endpoints_per_user
        self.policy = Policy(
            allow_loopback=settings.webhook_allow_loopback,
            allowed_networks=tuple(settings.webhook_allowed_networks),
        )
        tls = None
        if settings.webhook_ca_file is not None:
            tls = ssl.create_default_context(cafile=str(settings.webhook_ca_file))
        self.resolver = resolver
        self.sender = Sender(
            self.policy, timeout=settings.webhook_timeout_seconds, resolver=resolver, tls=tls
        )
        self.timeout = settings.webhook_timeout_seconds
        self.jobs = jobs
        self.in_app = in_app
        self.metrics = WebhookMetrics()
        self.channel = WebhookChannel(self)
        jobs.register(JOB, self.attempt)

    # -- registration ------------------------------------------------------------------------

    async def vet(self, url: str) -> None:
        """Raises :class:`Refused` when ``url`` may not be an endpoint (resolved now)."""
        try:
            async with asyncio.timeout(self.timeout):
                await vet(url, self.policy, self.resolver)
        except TimeoutError:
            raise Refused("unresolvable", "resolving the host took too long") from None

    # -- deliveries --------------------------------------------------------------------------

    def _stage_attempt(
        self, uow: UnitOfWork, delivery: WebhookDelivery, job: str, at: datetime | None
    ) -> None:
        ref = f"{delivery.id}:{job}"
        self.jobs.schedule(uow, JOB, ref, at=at, user_id=delivery.user_id, key=ref)

    async def stage(self, notice: Notice, uow: UnitOfWork) -> int:
        """Make the notice's deliveries (one per endpoint, once) and stage their first
        attempts; the number made now."""
        session = uow.session
        endpoints = (
            await session.exec(
                select(WebhookEndpoint)
                .where(col(WebhookEndpoint.user_id) == notice.user_id)
                .where(col(WebhookEndpoint.enabled).is_(True))
                .order_by(col(WebhookEndpoint.created_at))
            )
        ).all()
        wanted = [e for e in endpoints if accepts(e, notice.category)]
        if not wanted:
            return 0
        made_for = set(
            (
                await session.exec(
                    select(WebhookDelivery.endpoint_id)
                    .where(col(WebhookDelivery.source) == notice.source)
                    .where(col(WebhookDelivery.endpoint_id).in_([e.id for e in wanted]))
                )
            ).all()
        )
        inbox_id = (
            await session.exec(
                select(Notification.seq)
                .where(col(Notification.user_id) == notice.user_id)
                .where(col(Notification.source) == notice.source)
            )
        ).first()
        stamp = now()
        body = body_of(notice, inbox_id, stamp)
        wait = self.schedule[0]
        first = stamp + timedelta(seconds=wait)
        made = 0
        for endpoint in wanted:
            if endpoint.id in made_for:
                log.info("webhook delivery of %s to %s exists", notice.source, endpoint.id)
                continue
            delivery = WebhookDelivery(
                id=new_message_id(),
                endpoint_id=endpoint.id,
                user_id=notice.user_id,
                source=notice.source,
                category=notice.category,
                event_id=notice.event_id,
                payload=body,
                next_attempt=1,
                next_attempt_at=first,
                created_at=stamp,
                updated_at=stamp,
            )
            session.add(delivery)
            self._stage_attempt(uow, delivery, "1", first if wait > 0 else None)
            made += 1
        await session.flush()
        return made

    async def resend(self, uow: UnitOfWork, delivery: WebhookDelivery) -> str:
        """Stage a manual re-send of ``delivery`` (at once); its job label (``r1``…)."""
        delivery.resends += 1
        delivery.updated_at = now()
        job = f"r{delivery.resends}"
        uow.session.add(delivery)
        self._stage_attempt(uow, delivery, job, None)
        await uow.session.flush()
        return job

    # -- the job -----------------------------------------------------------------------------

    async def attempt(self, job: NotificationJobV1, uow: UnitOfWork) -> None:
        """A ``webhook_attempt`` job: one attempt of one delivery (see the module doc)."""
        match = _JOB_REF.fullmatch(job.ref)
        if match is None:
            raise PermanentError(f"not a webhook attempt: {job.ref!r}")
        delivery_id, label = match.group(1), match.group(2)
        if uow.suppress_side_effects:
            log.info("replayed webhook attempt %s: the endpoint is not called", job.ref)
            return
        session = uow.session
        delivery = await _delivery(session, delivery_id)
        if delivery is None:
            log.info("webhook attempt %s: the delivery is gone", job.ref)
            return
        endpoint = await session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None:
            return
        if await _made(session, delivery_id, label):
            log.info("webhook attempt %s was made before", job.ref)
            return
        manual = label.startswith("r")
        if not manual and not _expects(delivery, int(label)):
            log.info("webhook attempt %s is not due any more (%s)", job.ref, delivery.status)
            return
        if not endpoint.enabled:
            log.info("webhook attempt %s: endpoint %s is disabled", job.ref, endpoint.id)
            if not manual and await _lock(session, endpoint.id):
                await _end_pending(session, endpoint.id)
            return

        stamp = now()
        # the request, before this transaction writes anything: no lock held meanwhile
        result = await self.sender.send(
            endpoint.url, delivery.id, delivery.payload, signing_secrets(endpoint, stamp)
        )
        self.metrics.attempts.labels(self.metrics.service, result.outcome).inc()
        if result.duration_ms is not None:
            self.metrics.duration.labels(self.metrics.service).observe(result.duration_ms / 1000)
        log.info(
            "webhook attempt %s to %s: %s%s",
            job.ref,
            endpoint.id,
            result.outcome,
            f" {result.status_code}" if result.status_code is not None else "",
        )

        if not await _lock(session, endpoint.id):
            return  # deleted meanwhile (with its deliveries)
        endpoint = await _fresh(session, WebhookEndpoint, endpoint.id)
        fresh = await _delivery(session, delivery_id, fresh=True)
        if endpoint is None or fresh is None:
            return
        delivery = fresh
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                endpoint_id=endpoint.id,
                user_id=delivery.user_id,
                job=label,
                attempted_at=stamp,
                duration_ms=result.duration_ms,
                status_code=result.status_code,
                error=result.error,
                detail=result.detail,
                succeeded=result.succeeded,
            )
        )
        delivery.attempts += 1
        delivery.updated_at = stamp
        if result.succeeded:
            delivery.status = "succeeded"
            delivery.next_attempt = None
            delivery.next_attempt_at = None
            endpoint.failing_since = None
            endpoint.last_success_at = stamp
        else:
            if endpoint.failing_since is None:
                endpoint.failing_since = stamp
            failing_for = stamp - as_utc(endpoint.failing_since)
            if result.status_code == 410:
                await self._disable(uow, endpoint, "gone", stamp)
            elif failing_for >= self.disable_after and endpoint.enabled:
                await self._disable(uow, endpoint, "failing", stamp)
            elif not manual and _expects(delivery, int(label)):
                self._next(uow, delivery, int(label), stamp)
        session.add(delivery)
        session.add(endpoint)
        await session.flush()

    def _next(self, uow: UnitOfWork, delivery: WebhookDelivery, number: int, at: datetime) -> None:
        """After scheduled attempt ``number`` failed: stage the next, or give up."""
        if number >= len(self.schedule):
            delivery.status = "failed"
            delivery.next_attempt = None
            delivery.next_attempt_at = None
            return
        due = at + timedelta(seconds=self.schedule[number])
        delivery.next_attempt = number + 1
        delivery.next_attempt_at = due
        self._stage_attempt(uow, delivery, str(number + 1), due)

    async def _disable(
        self, uow: UnitOfWork, endpoint: WebhookEndpoint, reason: DisableReason, at: datetime
    ) -> None:
        """Disable ``endpoint`` (the service's decision), end its pending deliveries, tell the
        user in-app."""
        endpoint.enabled = False
        endpoint.disabled_reason = reason
        endpoint.disabled_at = at
        endpoint.updated_at = at
        uow.session.add(endpoint)
        await uow.session.flush()
        await _end_pending(uow.session, endpoint.id)
        self.metrics.disabled.labels(self.metrics.service, reason).inc()
        log.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)
        since = as_utc(endpoint.failing_since or at)
        host = _host_of(endpoint.url)
        why = (
            "it answered 410 Gone"
            if reason == "gone"
            else f"its deliveries have failed since {since:%Y-%m-%d %H:%M} UTC"
        )
        notice = Notice(
            user_id=endpoint.user_id,
            category="account",
            urgent=True,
            title="A webhook endpoint was disabled",
            body=(
                f"Your webhook endpoint at {host} was disabled: {why}. No notifications are "
                "sent to it until you enable it again."
            ),
            source=f"webhook.disabled:{endpoint.id}:{int(since.timestamp())}",
            event_id=context.current().event_id or f"webhook.disabled:{endpoint.id}",
        )
        await self.in_app.deliver(notice, uow)

    # -- the API's changes -------------------------------------------------------------------

    def new_endpoint(
        self, user_id: str, url: str, description: str | None, categories: list[Category] | None
    ) -> tuple[WebhookEndpoint, str]:
        secret = new_secret()
        stamp = now()
        endpoint = WebhookEndpoint(
            id=new_endpoint_id(),
            user_id=user_id,
            url=url,
            description=description,
            categories=joined(categories),
            secret=secret,
            created_at=stamp,
            updated_at=stamp,
        )
        return endpoint, secret

    def rotate(self, endpoint: WebhookEndpoint) -> str:
        """A new secret; the current one keeps signing for the rotation period."""
        stamp = now()
        secret = new_secret()
        endpoint.previous_secret = endpoint.secret
        endpoint.previous_secret_until = stamp + self.rotation
        endpoint.secret = secret
        endpoint.updated_at = stamp
        return secret

    @staticmethod
    def set_enabled(endpoint: WebhookEndpoint, enabled: bool) -> None:
        """The user's switch: enabling restarts the failure clock; disabling is ``user``."""
        stamp = now()
        if enabled and not endpoint.enabled:
            endpoint.enabled = True
            endpoint.disabled_reason = None
            endpoint.disabled_at = None
            endpoint.failing_since = None
        elif not enabled and endpoint.enabled:
            endpoint.enabled = False
            endpoint.disabled_reason = "user"
            endpoint.disabled_at = stamp
        endpoint.updated_at = stamp


def joined(categories: list[Category] | None) -> str | None:
    if categories is None:
        return None
    return ",".join(c for c in CATEGORIES if c in categories)


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host or "its host"
    except (httpx.InvalidURL, ValueError):
        return "its host"


def _expects(delivery: WebhookDelivery, number: int) -> bool:
    return delivery.status == "pending" and delivery.next_attempt == number


async def _delivery(
    session: AsyncSession, delivery_id: str, *, fresh: bool = False
) -> WebhookDelivery | None:
    query = select(WebhookDelivery).where(col(WebhookDelivery.id) == delivery_id)
    if fresh:
        query = query.execution_options(populate_existing=True)
    return (await session.exec(query)).first()


async def _fresh(session: AsyncSession, table: type[WebhookEndpoint], key: str) -> Any:
    return await session.get(table, key, populate_existing=True)


async def _made(session: AsyncSession, delivery_id: str, job: str) -> bool:
    found = await session.exec(
        select(WebhookAttempt.seq)
        .where(col(WebhookAttempt.delivery_id) == delivery_id)
        .where(col(WebhookAttempt.job) == job)
    )
    return found.first() is not None


async def lock_endpoint(session: AsyncSession, endpoint_id: str) -> bool:
    """Lock the endpoint's row until the transaction ends (a write: SQLite's write lock, a
    PostgreSQL row lock); False if it does not exist. Every change to an endpoint or its
    deliveries takes it first, so attempts, re-sends and the API's changes come in turn."""
    result = await session.exec(
        update(WebhookEndpoint)
        .where(col(WebhookEndpoint.id) == endpoint_id)
        .values(updated_at=col(WebhookEndpoint.updated_at))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


_lock = lock_endpoint


async def _end_pending(session: AsyncSession, endpoint_id: str) -> None:
    """The endpoint's deliveries still waiting for attempts get none: ``failed``."""
    await session.exec(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.endpoint_id) == endpoint_id)
        .where(col(WebhookDelivery.status) == "pending")
        .values(status="failed", next_attempt=None, next_attempt_at=None, updated_at=now())
        .execution_options(synchronize_session="fetch")
    )


async def erase_user(session: AsyncSession, user_id: str) -> int:
    """``user.erased``: the user's endpoints, deliveries and attempts (rows removed). Their
    scheduled attempts go with the outbox purge (the jobs carry the user id)."""
    removed = 0
    for table in (WebhookAttempt, WebhookDelivery, WebhookEndpoint):
        result = await session.exec(delete(table).where(col(table.user_id) == user_id))
        removed += result.rowcount or 0
    return removed


async def delete_endpoint(session: AsyncSession, endpoint_id: str) -> None:
    for table in (WebhookAttempt, WebhookDelivery):
        await session.exec(delete(table).where(col(table.endpoint_id) == endpoint_id))
    await session.exec(delete(WebhookEndpoint).where(col(WebhookEndpoint.id) == endpoint_id))
