from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlmodel import select

from tributary.contracts.envelope import new_event
from tributary.contracts.events import PaymentSucceededV1, SubscriptionActivatedV1
from tributary.identity.handlers import on_payment_succeeded
from tributary.identity.models import Subscription, User
from tributary.messaging.errors import PermanentError
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


async def test_a_second_payment_activates_a_second_subscription(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = await signed_up(uow)
        await on_payment_succeeded(payment_succeeded(user.id, "pay_first0001"), cast(Any, uow))
        await uow.session.flush()
        await on_payment_succeeded(payment_succeeded(user.id, "pay_second001"), cast(Any, uow))

        ids = {cast(SubscriptionActivatedV1, p).subscription_id for p, _ in uow.outbox.events}
        assert len(ids) == 2


async def test_a_payment_for_an_unknown_user_is_a_permanent_error(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        with pytest.raises(PermanentError, match="unknown user usr_nobody0001"):
            await on_payment_succeeded(payment_succeeded("usr_nobody0001"), cast(Any, uow))
        assert uow.outbox.events == []


def test_subscription_ids_derive_from_the_payment() -> None:
    first = Subscription.id_for_payment("pay_0123456789")
    assert first == Subscription.id_for_payment("pay_0123456789")
    assert first != Subscription.id_for_payment("pay_9876543210")
    assert first.startswith("sub_")
    assert len(first) == len("sub_") + 20
