"""Webhook delivery: retried on errors and timeouts on the configured schedule, the same id
and body every attempt (each signed anew), given up after the last, durable across a restart."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import select

from tributary.payment_provider.models import WebhookMessage
from tributary.payment_provider.testing import WebhookReceiver, running_provider
from tributary.testkit.waiting import eventually


async def message_states(sessions: object) -> list[WebhookMessage]:
    async with sessions() as session:  # type: ignore[operator]
        return list((await session.exec(select(WebhookMessage))).all())


async def test_a_webhook_answered_with_errors_is_retried_until_delivered(
    database_url: str, receiver: WebhookReceiver
) -> None:
    receiver.answers = [500, 503, 404]
    async with running_provider(database_url, receiver.url) as provider:
        checkout = await provider.checkout()
        await provider.pay(checkout["id"], "succeed")
        attempts = await receiver.wait(4)
        assert len({a.id for a in attempts}) == 1  # one message, one id
        assert all(a.verified for a in attempts)  # each attempt signed (anew) with the secret
        assert len({str(a.body) for a in attempts}) == 1

        async def delivered() -> bool:
            [message] = await message_states(provider.sessions)
            return message.delivered_at is not None

        await eventually(delivered, what="the fourth attempt recorded as delivered")
        [message] = await message_states(provider.sessions)
        assert (message.attempts, message.last_status, message.failed_at) == (4, 200, None)
        assert message.next_attempt_at is None


async def test_a_webhook_that_times_out_is_retried_and_one_never_answered_is_given_up(
    database_url: str, receiver: WebhookReceiver
) -> None:
    receiver.hang = [1.5]  # the first attempt outlives the 0.5 s timeout
    receiver.answers = [200]
    async with running_provider(
        database_url, receiver.url, PAYMENT_PROVIDER_WEBHOOK_TIMEOUT_SECONDS=0.5
    ) as provider:
        first = await provider.checkout(reference="ref-timeout")
        await provider.pay(first["id"], "succeed")

        async def settled() -> bool:
            states = await message_states(provider.sessions)
            return bool(states) and all(m.next_attempt_at is None for m in states)

        await eventually(settled, what="the first message delivered on its second attempt")
        [message] = await message_states(provider.sessions)
        assert (message.attempts, message.delivered_at is not None) == (2, True)

        # the second message's answers only (a slow first attempt may have taken others)
        receiver.answers = [500, 500, 500, 500, 500]
        second = await provider.checkout(reference="ref-given-up")
        await provider.pay(second["id"], "decline")
        await eventually(settled, what="the second message given up")
        given_up = [m for m in await message_states(provider.sessions) if m.failed_at]
        assert [(m.type, m.attempts, m.last_status) for m in given_up] == [
            ("payment.failed", 4, 500)  # the first attempt and the three retries of the schedule
        ]


async def test_a_message_waiting_for_its_retry_is_sent_by_the_next_process(
    database_url: str, receiver: WebhookReceiver
) -> None:
    receiver.answers = [500]
    slow = {"PAYMENT_PROVIDER_WEBHOOK_RETRY_SECONDS": (3600.0,)}
    async with running_provider(database_url, receiver.url, **slow) as provider:
        checkout = await provider.checkout()
        await provider.pay(checkout["id"], "succeed")
        await receiver.wait(1)

        async def scheduled() -> bool:
            [message] = await message_states(provider.sessions)
            return message.attempts == 1

        await eventually(scheduled, what="the failed attempt recorded")
    # the retry is due in an hour; a restarted provider (same database) finds it and, once it
    # is due, sends it: make it due now, as if the hour had passed while the provider was down
    async with running_provider(database_url, receiver.url) as provider:
        async with provider.sessions() as session:
            [message] = (await session.exec(select(WebhookMessage))).all()
            message.next_attempt_at = datetime.now(UTC)
            session.add(message)
            await session.commit()
        provider.app.state.sender.wake()
        second = await receiver.wait(2)
        assert second[1].id == second[0].id
        assert second[1].verified


async def test_webhooks_are_recorded_and_not_sent_without_a_target(database_url: str) -> None:
    async with running_provider(database_url, None) as provider:
        checkout = await provider.checkout()
        await provider.pay(checkout["id"], "succeed")
        [message] = await message_states(provider.sessions)
        assert (message.type, message.attempts) == ("payment.succeeded", 0)
