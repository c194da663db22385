from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlmodel import select

from tributary.contracts.envelope import new_event
from tributary.contracts.events import (
    PaymentSucceededV1,
    SubscriptionActivatedV1,
    SubscriptionActivationRejectedV1,
    SubscriptionCancelledV1,
)
from tributary.identity.handlers import on_payment_succeeded, on_subscription_cancelled
from tributary.identity.models import Subscription, User
from tributary.service.testing import FakeUnitOfWork, fake_uow


def payment_succeeded(user_id: str, payment_id: str = "pay_0123456789", plan: str = "pro") -> Any:
    return new_event(
        routing_key="payment.succeeded.v1",
        source="/services/billing",
        data=PaymentSucceededV1(
            payment_id=payment_id,
            user_id=user_id,
            amount_cents=1900,
            currency="EUR",
            plan=cast(Any, plan),
            provider_reference="ch_42",
            paid_at=datetime.now(UTC),
        ),
        idempotencykey=f"payment.succeeded:{payment_id}",
    )


async def signed_up(uow: FakeUnitOfWork) -> User:
    user = User.register(email="ada@example.com", name="Ada Lovelace", plan="free", locale="en-GB")
    uow.session.add(user)
    await uow.session.flush()
    return user


async def test_a_payment_puts_the_user_on_the_paid_plan_and_activates_a_subscription(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        await on_payment_succeeded(payment_succeeded(user.id, plan="starter"), cast(Any, uow))

        assert (await uow.session.get(User, user.id)).plan == "starter"  # type: ignore[union-attr]
        [(payload, meta)] = uow.outbox.events
        assert isinstance(payload, SubscriptionActivatedV1)
        assert (payload.user_id, payload.plan, payload.payment_id) == (
            user.id,
            "starter",
            "pay_0123456789",
        )
        assert payload.subscription_id == Subscription.id_for_payment("pay_0123456789")
        assert meta["subject"] == f"users/{user.id}"
        assert meta["idempotency_key"] == f"subscription.activated:{payload.subscription_id}"


async def test_the_same_payment_announced_twice_activates_one_subscription(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        await on_payment_succeeded(payment_succeeded(user.id), cast(Any, uow))
        await uow.session.flush()
        await on_payment_succeeded(payment_succeeded(user.id), cast(Any, uow))

        assert len((await uow.session.exec(select(Subscription))).all()) == 1
        assert len(uow.outbox.events) == 1


async def test_a_second_payment_for_another_plan_activates_a_second_subscription(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        await on_payment_succeeded(payment_succeeded(user.id, "pay_first0001"), cast(Any, uow))
        await uow.session.flush()
        await on_payment_succeeded(
            payment_succeeded(user.id, "pay_second001", plan="starter"), cast(Any, uow)
        )

        ids = {cast(SubscriptionActivatedV1, p).subscription_id for p, _ in uow.outbox.events}
        assert len(ids) == 2


def rejections(uow: FakeUnitOfWork) -> list[tuple[SubscriptionActivationRejectedV1, Any]]:
    return [(p, m) for p, m in uow.outbox.events if isinstance(p, SubscriptionActivationRejectedV1)]


async def test_a_second_payment_for_the_same_active_plan_is_rejected_as_already_subscribed(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        await on_payment_succeeded(payment_succeeded(user.id, "pay_first0001"), cast(Any, uow))
        await uow.session.flush()
        await on_payment_succeeded(payment_succeeded(user.id, "pay_second001"), cast(Any, uow))
        await uow.session.flush()

        [(rejected, meta)] = rejections(uow)
        assert (rejected.payment_id, rejected.user_id, rejected.plan, rejected.reason) == (
            "pay_second001",
            user.id,
            "pro",
            "already_subscribed",
        )
        assert meta["idempotency_key"] == "subscription.activation_rejected:pay_second001"
        assert meta["subject"] == f"users/{user.id}"
        assert len((await uow.session.exec(select(Subscription))).all()) == 1


async def test_a_payment_for_an_unknown_user_is_rejected_not_dead_lettered(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await on_payment_succeeded(payment_succeeded("usr_nobody0001"), cast(Any, uow))

        [(rejected, _)] = rejections(uow)
        assert (rejected.user_id, rejected.reason) == ("usr_nobody0001", "unknown_user")
        assert (await uow.session.exec(select(Subscription))).all() == []


def subscription_cancelled(
    user_id: str, payment_id: str | None = "pay_0123456789", plan: str = "pro"
) -> Any:
    return new_event(
        routing_key="subscription.cancelled.v1",
        source="/services/billing",
        data=SubscriptionCancelledV1(
            subscription_id="sub_billing00001",
            user_id=user_id,
            plan=cast(Any, plan),
            reason="activation_timeout",
            payment_id=payment_id,
            cancelled_at=datetime.now(UTC),
        ),
    )


async def test_a_cancelled_subscription_puts_the_user_back_on_their_other_plan_or_free(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        handle = cast(Any, uow)
        await on_payment_succeeded(payment_succeeded(user.id, "pay_starter001", "starter"), handle)
        await uow.session.flush()
        await on_payment_succeeded(payment_succeeded(user.id, "pay_pro0000001", "pro"), handle)
        await uow.session.flush()
        assert user.plan == "pro"

        await on_subscription_cancelled(subscription_cancelled(user.id, "pay_pro0000001"), handle)
        await uow.session.flush()
        assert user.plan == "starter"  # the other active subscription
        pro = await uow.session.get(Subscription, Subscription.id_for_payment("pay_pro0000001"))
        assert pro is not None
        assert (pro.status, pro.cancelled_at is not None) == ("cancelled", True)

        again = subscription_cancelled(user.id, "pay_pro0000001")
        await on_subscription_cancelled(again, handle)  # again: nothing more
        await on_subscription_cancelled(
            subscription_cancelled(user.id, "pay_starter001", "starter"), handle
        )
        await uow.session.flush()
        assert user.plan == "free"
        # a cancellation before any payment concerns nothing identity holds
        await on_subscription_cancelled(subscription_cancelled(user.id, None), handle)
        statuses = (await uow.session.exec(select(Subscription.status))).all()
        assert sorted(statuses) == ["cancelled", "cancelled"]
        # the pro plan bought again is no duplicate: the first one is cancelled
        await on_payment_succeeded(payment_succeeded(user.id, "pay_pro0000002", "pro"), handle)
        await uow.session.flush()
        assert user.plan == "pro"
        assert rejections(uow) == []


async def test_a_tombstone_keeps_a_late_payment_from_activating_anything(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        handle = cast(Any, uow)
        # billing gave up waiting and cancelled before identity saw the payment
        await on_subscription_cancelled(subscription_cancelled(user.id, "pay_late000001"), handle)
        await uow.session.flush()
        tombstone = await uow.session.get(
            Subscription, Subscription.id_for_payment("pay_late000001")
        )
        assert tombstone is not None
        assert (tombstone.status, tombstone.activated_at) == ("cancelled", None)

        await on_payment_succeeded(payment_succeeded(user.id, "pay_late000001"), handle)
        await uow.session.flush()
        assert user.plan == "free"
        assert uow.outbox.events == []  # neither activated nor rejected: it is over
        # a cancellation for someone identity does not know leaves nothing behind
        await on_subscription_cancelled(
            subscription_cancelled("usr_nobody0001", "pay_other00001"), handle
        )
        assert len((await uow.session.exec(select(Subscription))).all()) == 1


def test_subscription_ids_derive_from_the_payment() -> None:
    first = Subscription.id_for_payment("pay_0123456789")
    assert first == Subscription.id_for_payment("pay_0123456789")
    assert first != Subscription.id_for_payment("pay_9876543210")
    assert first.startswith("sub_")
    assert len(first) == len("sub_") + 20
