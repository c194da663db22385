"""Webhooks to the merchant: staged in the provider's database, signed and sent with retries.

A payment's webhook is written in the transaction that changes the payment, so it is never
lost and never sent for a change that did not commit. A background sender posts each due
message to ``PAYMENT_PROVIDER_WEBHOOK_URL``, signed per Standard Webhooks (``webhook-id`` =
the message id, the provider's event id; ``webhook-timestamp``; ``webhook-signature`` =
``v1,<base64 HMAC-SHA256 of id.timestamp.body>``). A 2xx answer delivers it; anything else
(another status, a timeout, no connection) schedules the next attempt after the next delay of
``PAYMENT_PROVIDER_WEBHOOK_RETRY_SECONDS``, and after the last one the message is given up.
Each attempt is signed anew (its own timestamp) with the same id and body.

The retry state lives in the database: a restarted provider carries on where it stopped. An
attempt claims its message by moving ``next_attempt_at`` past the attempt's timeout, so two
senders on one database never post one message at once, and a sender that dies mid-attempt
leaves its message due again a little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from standardwebhooks.webhooks import Webhook

from tributary.messaging.db import now
from tributary.payment_provider.models import Checkout, Payment, WebhookMessage, new_id

log = logging.getLogger("tributary.payment_provider.webhooks")

IN_FLIGHT = 8
"""Messages posted at once."""
BATCH = 50


def stage(session: AsyncSession, type_: str, data: Mapping[str, Any]) -> WebhookMessage:
    """Add a webhook message to the session's transaction, due at once."""
    stamp = now()
    body = json.dumps(
        {"type": type_, "timestamp": stamp.isoformat().replace("+00:00", "Z"), "data": data},
        separators=(",", ":"),
        sort_keys=True,
    )
    message = WebhookMessage(
        id=new_id("msg"), type=type_, body=body, created_at=stamp, next_attempt_at=stamp
    )
    session.add(message)
    return message


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def checkout_data(checkout: Checkout) -> dict[str, Any]:
    return {
        "checkout_id": checkout.id,
        "amount_cents": checkout.amount_cents,
        "currency": checkout.currency,
        "reference": checkout.reference,
        "metadata": dict(checkout.metadata_),
    }


def succeeded(session: AsyncSession, checkout: Checkout, payment: Payment) -> WebhookMessage:
    data = {**checkout_data(checkout), "payment_id": payment.id, "paid_at": iso(payment.created_at)}
    return stage(session, "payment.succeeded", data)


def failed(session: AsyncSession, checkout: Checkout, reason: str) -> WebhookMessage:
    data = {**checkout_data(checkout), "reason": reason, "failed_at": iso(now())}
    return stage(session, "payment.failed", data)


class Sender:
    """Sends due webhook messages and settles delayed payments; ``wake()`` after a commit."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        url: str | None,
        secret: str,
        retry_seconds: tuple[float, ...],
        timeout_seconds: float,
        poll_seconds: float,
        settle: Callable[[], Any],
    ) -> None:
        self.sessions = sessions
        self.url = url
        self.signer = Webhook(secret)
        self.retry_seconds = retry_seconds
        self.timeout_seconds = timeout_seconds
        self.poll_seconds = poll_seconds
        self._settle = settle
        self._wake = asyncio.Event()
        self._stopping = False
        self._http = httpx.AsyncClient(
            timeout=timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": "tributary-payment-provider/0.1"},
        )

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def run(self) -> None:
        """Until stopped: settle due delayed payments, send due messages, sleep until the next."""
        while not self._stopping:
            self._wake.clear()
            try:
                await self._settle()
                if self.url is not None:
                    while await self.send_due() == BATCH and not self._stopping:
                        pass
                pause = await self._until_next_due()
            except Exception:  # a database hiccup must not end the loop: log and try again
                log.exception("webhook sender: a round failed; retrying")
                pause = self.poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    async def _until_next_due(self) -> float:
        async with self.sessions() as session:
            due = [
                await session.scalar(
                    select(col(WebhookMessage.next_attempt_at))
                    .where(col(WebhookMessage.next_attempt_at).is_not(None))
                    .order_by(col(WebhookMessage.next_attempt_at))
                    .limit(1)
                ),
                await session.scalar(
                    select(col(Checkout.settle_at))
                    .where(col(Checkout.settle_at).is_not(None))
                    .order_by(col(Checkout.settle_at))
                    .limit(1)
                ),
            ]
        pause = self.poll_seconds
        for when in due:
            if when is not None:
                pause = min(pause, max(0.0, (when - now()).total_seconds()))
        return pause

    async def send_due(self) -> int:
        """Claim and post the messages due now (at most ``BATCH``); how many were attempted."""
        async with self.sessions() as session:
            rows = await session.exec(
                select(WebhookMessage)
                .where(col(WebhookMessage.next_attempt_at) <= now())
                .order_by(col(WebhookMessage.next_attempt_at))
                .limit(BATCH)
            )
            due = list(rows.all())
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def attempt(message: WebhookMessage) -> None:
            async with gate:
                if await self._claim(message):
                    await self._attempt(message)

        await asyncio.gather(*(attempt(m) for m in due))
        return len(due)

    async def _claim(self, message: WebhookMessage) -> bool:
        lease = now() + timedelta(seconds=self.timeout_seconds + 30)
        async with self.sessions() as session:
            result = await session.exec(
                update(WebhookMessage)
                .where(col(WebhookMessage.id) == message.id)
                .where(col(WebhookMessage.next_attempt_at) == message.next_attempt_at)
                .values(next_attempt_at=lease)
            )
            await session.commit()
        return bool(result.rowcount)

    def headers(self, message_id: str, body: str, at: datetime) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self.signer.sign(message_id, at, body),
        }

    async def _attempt(self, message: WebhookMessage) -> None:
        assert self.url is not None  # noqa: S101 -- send_due runs only with a target
        status: int | None = None
        error: str | None = None
        try:
            response = await self._http.post(
                self.url,
                content=message.body.encode(),
                headers=self.headers(message.id, message.body, now()),
            )
            status = response.status_code
            if not 200 <= status < 300:
                error = f"answered {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        attempts = message.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status, "last_error": error}
        if error is None:
            values.update(delivered_at=now(), next_attempt_at=None)
            log.info("webhook %s (%s) delivered, attempt %d", message.id, message.type, attempts)
        elif attempts > len(self.retry_seconds):
            values.update(failed_at=now(), next_attempt_at=None)
            log.warning("webhook %s given up after %d attempts: %s", message.id, attempts, error)
        else:
            delay = self.retry_seconds[attempts - 1]
            values.update(next_attempt_at=now() + timedelta(seconds=delay))
            log.info(
                "webhook %s attempt %d failed (%s); next in %s s",
                message.id,
                attempts,
                error,
                delay,
            )
        async with self.sessions() as session:
            await session.exec(
                update(WebhookMessage).where(col(WebhookMessage.id) == message.id).values(**values)
            )
            await session.commit()
