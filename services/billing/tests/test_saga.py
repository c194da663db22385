"""The saga without a broker: random sequences of its inputs against the pure aggregate (with a
model of the provider's idempotent refunds), the same through the real store and projections
(the sagas read model folds to the aggregate's own saga), activation and timeout racing on
one subscription, the refund step's answers to a provider that is down or refuses, and the
sagas projection added to a store that has events already (migration 0002)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command as alembic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto
from tributary.billing.commands import Billing
from tributary.billing.events import CURRENT_VERSIONS, DomainEvent, Refunded
from tributary.billing.eventstore import ConcurrencyConflict, EventStore
from tributary.billing.handlers import SagaHandlers, event_handlers
from tributary.billing.metrics import BillingMetrics
from tributary.billing.projections import PROJECTIONS, Projector
from tributary.billing.provider import ProviderRefused, ProviderUnavailable, Refund
from tributary.billing.saga import SAGA_STATES, SagaFold, advance
from tributary.billing.subscription import PAID, InvalidTransition, Subscription
from tributary.billing.upcasting import UPCASTERS
from tributary.contracts.envelope import Event, new_event
from tributary.contracts.events import (
    BillingSagaV1,
    SubscriptionActivatedV1,
    SubscriptionActivationRejectedV1,
)
from tributary.messaging import context
from tributary.messaging.context import MessageContext
from tributary.messaging.db import create_engine, session_factory
from tributary.messaging.errors import PermanentError
from tributary.messaging.uow import UnitOfWork
from tributary.service.migrations import alembic_config, upgrade

from .conftest import MIGRATIONS

AT = datetime(2026, 12, 1, tzinfo=UTC)
PRICE = 900
SAGA_REFUND = "re_saga"
"""The provider's id of the saga's refund: one per payment, however often it is asked."""

# the saga state each subscription status allows
STATES_OF_STATUS: dict[str | None, set[str]] = {
    "requested": {"awaiting_payment"},
    "pending_payment": {"awaiting_payment"},
    "checkout_failed": {"failed"},
    "payment_failed": {"failed"},
    "paid": {"awaiting_activation"},
    "active": {"completed"},
    "compensating": {"compensating"},
    "refund_due": {"compensating"},
    "cancelled": {"cancelled"},
    "refunded": {"compensated", "refunded"},
}


@dataclass
class ProviderModel:
    """The payment provider's side: refunds by id, one per idempotency key."""

    refunds: dict[str, int] = field(default_factory=dict)
    merchant_refunds: int = 0

    @property
    def left(self) -> int:
        return PRICE - sum(self.refunds.values())

    def saga_refund(self) -> tuple[str, int] | None:
        """The saga's whole-payment refund (the same one when asked again); None: refused
        (nothing left to refund)."""
        if SAGA_REFUND not in self.refunds:
            if self.left <= 0:
                return None
            self.refunds[SAGA_REFUND] = self.left
        return SAGA_REFUND, self.refunds[SAGA_REFUND]

    def merchant_refund(self, amount: int) -> tuple[str, int] | None:
        if amount > self.left:
            return None
        self.merchant_refunds += 1
        refund_id = f"re_merchant{self.merchant_refunds}"
        self.refunds[refund_id] = amount
        return refund_id, amount


INPUTS = st.lists(
    st.one_of(
        st.just(("checkout",)),
        st.just(("pay",)),
        st.just(("pay_again",)),
        st.just(("failed",)),
        st.just(("cancel",)),
        st.tuples(st.just("activate"), st.sampled_from(["act_1", "act_2"])),
        st.tuples(st.just("reject"), st.sampled_from(["unknown_user", "already_subscribed"])),
        st.just(("timeout",)),
        st.just(("refund_step",)),
        st.just(("saga_refund_webhook",)),
        st.tuples(st.just("merchant_refund"), st.sampled_from([100, 400, PRICE])),
    ),
    max_size=30,
)
"""The saga's inputs in any order, any number of times: the webhooks (payment, decline, the
provider's refund notices), identity's answers, the user's cancel, the saga's own steps."""


def decide(
    subscription: Subscription, provider: ProviderModel, step: tuple[Any, ...]
) -> list[DomainEvent]:
    kind = step[0]
    if kind == "checkout":
        return subscription.record_checkout("chk_1", "https://pay.example/x", AT)
    if kind in ("pay", "pay_again"):
        return subscription.payment_succeeded(
            payment_id="pay_00000001" if kind == "pay" else "pay_00000002",
            provider_payment_id="pi_1",
            provider_event_id="e",
            paid_at=AT,
            activation_due_at=AT + timedelta(minutes=5),
        )
    if kind == "failed":
        return subscription.payment_failed(
            payment_id="pay_00000001", provider_event_id="e", reason="no", at=AT
        )
    if kind == "cancel":
        return subscription.cancel(AT)
    if kind == "activate":
        return subscription.confirm_activation(activation_id=step[1], event_id="e", at=AT)
    if kind == "reject":
        return subscription.activation_rejected(reason=step[1], event_id="e", at=AT)
    if kind == "timeout":
        return subscription.activation_timed_out(AT)
    if kind == "refund_step":  # as the handler does: only while compensating
        if subscription.status != "compensating":
            return []
        made = provider.saga_refund()
        if made is None:
            return []  # refused: the step is dead-lettered, the saga stays compensating
        return subscription.refunded(
            refund_id=made[0], provider_event_id="step", amount_cents=made[1], reason="r", at=AT
        )
    if kind == "saga_refund_webhook":  # the provider's notice of the saga's refund
        if SAGA_REFUND not in provider.refunds:
            return []
        return subscription.refunded(
            refund_id=SAGA_REFUND,
            provider_event_id="hook",
            amount_cents=provider.refunds[SAGA_REFUND],
            reason="r",
            at=AT,
        )
    # the merchant refunds at the provider (a payment it holds), and its notice follows
    made = provider.merchant_refund(step[1]) if subscription.status in PAID else None
    if made is None:
        return []
    return subscription.refunded(
        refund_id=made[0], provider_event_id="hook", amount_cents=made[1], reason=None, at=AT
    )


def requested() -> tuple[Subscription, list[DomainEvent]]:
    subscription = Subscription("sub_sagaprop01")
    user = {"key_id": "dk_1", "ciphertext": "AAAA"}
    first = subscription.request(
        user=user, plan="starter", amount_cents=PRICE, currency="EUR", at=AT
    )
    subscription.apply(first[0], 1, AT)
    return subscription, list(first)


def check(subscription: Subscription, history: list[DomainEvent]) -> None:
    names = [e.name for e in history]
    refunds = [e for e in history if isinstance(e, Refunded)]
    saga = subscription.saga
    assert saga.state in SAGA_STATES
    assert saga.state in STATES_OF_STATUS[subscription.status], (subscription.status, saga)
    # never refunded twice: each refund id once, the saga's at most once, never more than paid
    assert len({r.refund_id for r in refunds}) == len(refunds)
    assert sum(r.amount_cents for r in refunds) == subscription.refunded_cents
    assert subscription.refunded_cents <= subscription.paid_cents
    for name in ("Cancelled", "CompensationStarted", "ActivationConfirmed", "PaymentSucceeded"):
        assert names.count(name) <= 1, name
    assert not {"ActivationConfirmed", "CompensationStarted"} <= set(names)
    if any(r.refund_id == SAGA_REFUND for r in refunds):
        assert "CompensationStarted" in names  # the saga refunds only what it compensates
    if saga.state == "compensated":
        assert subscription.refunded_cents == subscription.paid_cents == PRICE
        assert "Cancelled" in names
        assert "CompensationStarted" in names
        assert saga.reason is not None
    if saga.state == "completed":  # never refunded by the saga (the merchant may, in part)
        assert "CompensationStarted" not in names
        assert all(r.refund_id != SAGA_REFUND for r in refunds)
    if saga.state == "awaiting_activation":
        assert saga.pending_timeout_at == AT + timedelta(minutes=5)
    else:
        assert saga.pending_timeout_at is None
    # the fold again, from the events alone, gives the same saga
    again = SagaFold()
    for event in history:
        again = advance(again, event)
    assert again == saga


SAGA_INPUTS = ("activate", "reject", "timeout", "refund_step", "saga_refund_webhook")


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(inputs=INPUTS)
def test_random_saga_inputs_never_refund_twice_and_end_consistent(
    inputs: list[tuple[Any, ...]],
) -> None:
    subscription, history = requested()
    provider = ProviderModel()
    for step in inputs:
        try:
            decided = decide(subscription, provider, step)
        except InvalidTransition:
            continue
        for event in decided:
            subscription.apply(event, subscription.version + 1, AT)
            history.append(event)
        check(subscription, history)
        if step[0] in SAGA_INPUTS:  # the saga's inputs again (redelivered): nothing
            assert decide(subscription, provider, step) == []
    # whatever happened, a compensating saga whose payment is not all given back yet ends
    # compensated with its refund step
    if subscription.status == "compensating" and provider.left > 0:
        for event in decide(subscription, provider, ("refund_step",)):
            subscription.apply(event, subscription.version + 1, AT)
            history.append(event)
        check(subscription, history)
        assert subscription.saga.state == "compensated"


# -- through the store: the sagas read model is the aggregate's saga ---------------------------


_DATABASES: dict[str, str] = {}


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(inputs=INPUTS)
def test_random_saga_inputs_through_the_store_keep_the_sagas_read_model_in_step(
    tmp_path_factory: pytest.TempPathFactory, inputs: list[tuple[Any, ...]]
) -> None:
    if "url" not in _DATABASES:  # one database for every example, a subscription each
        path = tmp_path_factory.mktemp("saga") / "billing.db"
        _DATABASES["url"] = f"sqlite+aiosqlite:///{path}"
        asyncio.run(upgrade(MIGRATIONS, _DATABASES["url"]))
    asyncio.run(_through_the_store(_DATABASES["url"], inputs))


async def _through_the_store(url: str, inputs: list[tuple[Any, ...]]) -> None:
    engine = create_engine(url)
    sessions = session_factory(engine)
    billing = new_billing()
    provider = ProviderModel()
    subscription_id = f"sub_{uuid.uuid4().hex[:20]}"
    try:
        await start(billing, sessions, subscription_id)
        for step in inputs:
            async with UnitOfWork(sessions(), "/services/billing") as uow:
                subscription = await billing.load(uow.session, subscription_id)
                with contextlib.suppress(InvalidTransition):
                    await billing.save(uow, subscription, decide(subscription, provider, step))
                    await uow.commit()
        async with sessions() as session:
            loaded = await billing.load(session, subscription_id)
            table = await billing.projector.table_of(session, "sagas")
            row = (
                await session.exec(select(table).where(table.c.subscription_id == subscription_id))  # type: ignore[call-overload]
            ).one()
            assert (row.state, row.reason, row.pending_timeout_at, row.version) == (
                loaded.saga.state,
                loaded.saga.reason,
                loaded.saga.pending_timeout_at,
                loaded.version,
            )
    finally:
        await engine.dispose()


def new_billing() -> Billing:
    store = EventStore(UPCASTERS, CURRENT_VERSIONS)
    return Billing(store, Projector(store), BillingMetrics(), retries=5)


async def start(
    billing: Billing,
    sessions: async_sessionmaker[AsyncSession],
    subscription_id: str,
    *,
    payment_id: str | None = None,
    user_id: str = "usr_sagatest01",
) -> Subscription:
    """A subscription, requested with a checkout (and paid by ``payment_id``, if given),
    committed."""
    key = await crypto.ensure_key(sessions, user_id)
    async with UnitOfWork(sessions(), "/services/billing") as uow:
        subscription = Subscription(subscription_id)
        user = crypto.seal(key, user_id, crypto.aad(subscription_id, "user"))
        decided = subscription.request(
            user=user, plan="starter", amount_cents=PRICE, currency="EUR", at=AT
        )
        await billing.save(uow, subscription, decided)
        await billing.save(uow, subscription, decide(subscription, ProviderModel(), ("checkout",)))
        if payment_id is not None:
            decided = subscription.payment_succeeded(
                payment_id=payment_id,
                provider_payment_id=f"pi_{payment_id}",
                provider_event_id="e",
                paid_at=AT,
                activation_due_at=AT + timedelta(minutes=5),
            )
            await billing.save(uow, subscription, decided)
        await uow.commit()
    return subscription


# -- races and the refund step's failures, with the real handlers ------------------------------


def command(step: str, subscription_id: str) -> Event[BillingSagaV1]:
    return new_event(
        routing_key="billing.saga.v1",
        source="/services/billing",
        data=BillingSagaV1(step=step, subscription_id=subscription_id),  # type: ignore[arg-type]
    )


def activated(user_id: str, payment_id: str) -> Event[SubscriptionActivatedV1]:
    return new_event(
        routing_key="subscription.activated.v1",
        source="/services/identity",
        data=SubscriptionActivatedV1(
            subscription_id="sub_identity0001",
            user_id=user_id,
            plan="starter",
            payment_id=payment_id,
            activated_at=AT,
        ),
    )


async def as_the_runtime(
    sessions: async_sessionmaker[AsyncSession], handler: Any, event: Any
) -> None:
    """Handle ``event`` in a transaction of its own; a concurrent append: again (the runtime
    redelivers)."""
    for _ in range(20):
        try:
            async with UnitOfWork(sessions(), "/services/billing") as uow:
                await handler(event, uow)
                await uow.commit()
            return
        except ConcurrencyConflict:
            await asyncio.sleep(0)
    raise AssertionError("still conflicting after 20 attempts")


class NoProvider:
    async def refund(self, *_: Any, **__: Any) -> Refund:
        raise AssertionError("no refund expected")


async def test_activation_and_timeout_racing_end_in_exactly_one_outcome(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    billing = new_billing()
    saga = SagaHandlers(billing, billing.metrics, NoProvider)  # type: ignore[arg-type]
    on_activated = event_handlers(billing, billing.metrics, saga)[SubscriptionActivatedV1]
    ids = [f"sub_race{n:08d}" for n in range(8)]
    for subscription_id in ids:
        await start(billing, sessions, subscription_id, payment_id=f"pay_{subscription_id[4:]}")

    async def race(subscription_id: str, n: int) -> None:
        timeout = as_the_runtime(
            sessions, saga.on_step, command("activation_timeout", subscription_id)
        )
        activation = as_the_runtime(
            sessions, on_activated, activated("usr_sagatest01", f"pay_{subscription_id[4:]}")
        )
        await asyncio.gather(*((timeout, activation) if n % 2 else (activation, timeout)))

    await asyncio.gather(*(race(subscription_id, n) for n, subscription_id in enumerate(ids)))
    async with sessions() as session:
        table = await billing.projector.table_of(session, "sagas")
        for subscription_id in ids:
            stream = await billing.store.read_stream(session, subscription_id)
            assert [e.version for e in stream] == list(range(1, len(stream) + 1))
            types = [e.type for e in stream]
            # one outcome: activated (the timeout then finds nothing to do) or compensating
            # (the activation then comes too late); never both, never twice
            assert ("ActivationConfirmed" in types) != ("CompensationStarted" in types), types
            assert len(types) == 5, types
            loaded = await billing.load(session, subscription_id)
            assert loaded.saga.state in ("completed", "compensating")
            row = (
                await session.exec(select(table).where(table.c.subscription_id == subscription_id))  # type: ignore[call-overload]
            ).one()
            assert (row.state, row.version) == (loaded.saga.state, loaded.version)


class Provider:
    """The provider's refund answering as told: down, refusing, or refunding."""

    def __init__(self, *answers: Exception | Refund) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []

    async def refund(self, payment_id: str, **given: Any) -> Refund:
        self.calls.append({"payment_id": payment_id, **given})
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_the_refund_step_retries_a_provider_that_is_down_and_dead_letters_a_refusal(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    billing = new_billing()
    refund = Refund(
        id="re_0000000001", payment_id="pi_x", amount_cents=PRICE, created_at=AT, replayed=False
    )
    provider = Provider(ProviderUnavailable("down"), refund, refund)
    saga = SagaHandlers(billing, billing.metrics, lambda: provider)  # type: ignore[arg-type,return-value]
    await start(billing, sessions, "sub_refund00001", payment_id="pay_refund00001")
    await as_the_runtime(sessions, saga.on_step, command("activation_timeout", "sub_refund00001"))

    step = command("refund", "sub_refund00001")
    with pytest.raises(ProviderUnavailable):  # transient: the runtime retries with backoff
        await as_the_runtime(sessions, saga.on_step, step)
    async with sessions() as session:
        assert (await billing.load(session, "sub_refund00001")).saga.state == "compensating"
    await as_the_runtime(sessions, saga.on_step, step)  # the retry
    await as_the_runtime(sessions, saga.on_step, step)  # and once more: nothing asked
    assert [c["idempotency_key"] for c in provider.calls] == ["saga-refund:pay_refund00001"] * 2
    assert {(c["payment_id"], c["amount_cents"], c["reason"]) for c in provider.calls} == {
        ("pi_pay_refund00001", None, "activation_timeout")
    }
    async with sessions() as session:
        loaded = await billing.load(session, "sub_refund00001")
    assert (loaded.saga.state, loaded.status, loaded.refund_ids) == (
        "compensated",
        "refunded",
        {"re_0000000001"},
    )
    assert [s.type for s in loaded.history][-4:] == [
        "ActivationTimeoutScheduled",
        "CompensationStarted",
        "Refunded",
        "Cancelled",
    ]

    # a refusal (say, nothing left to refund) is final: dead-lettered, the saga stays
    refused = Provider(ProviderRefused(409, "refunded in full already"))
    saga = SagaHandlers(billing, billing.metrics, lambda: refused)  # type: ignore[arg-type,return-value]
    await start(billing, sessions, "sub_refused0001", payment_id="pay_refused0001")
    await as_the_runtime(sessions, saga.on_step, command("activation_timeout", "sub_refused0001"))
    with pytest.raises(PermanentError, match="stays compensating"):
        await as_the_runtime(sessions, saga.on_step, command("refund", "sub_refused0001"))
    async with sessions() as session:
        assert (await billing.load(session, "sub_refused0001")).saga.state == "compensating"
        table = await billing.projector.table_of(session, "sagas")
        stuck = (
            await session.exec(
                select(table.c.subscription_id).where(table.c.state == "compensating")
            )  # type: ignore[call-overload]
        ).all()
    assert [row.subscription_id for row in stuck] == ["sub_refused0001"]


# -- the sagas projection added to a store with events (migration 0002) ------------------------


async def test_the_sagas_projection_added_later_catches_up_from_the_whole_store(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    await asyncio.to_thread(alembic.upgrade, alembic_config(MIGRATIONS, url), "0001")
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        # the code before the saga: two projections, no sagas table yet
        store = EventStore(UPCASTERS, CURRENT_VERSIONS)
        old = Billing(store, Projector(store, PROJECTIONS[:2]), BillingMetrics(), retries=3)
        await start(old, sessions, "sub_before00001", payment_id="pay_before00001")
        await start(old, sessions, "sub_before00002")
        await engine.dispose()
        await upgrade(MIGRATIONS, url)
        billing = new_billing()
        # a live append before any catch-up: the projection gets the events it missed first
        await start(billing, sessions, "sub_after000001")
        async with sessions() as session:
            table = await billing.projector.table_of(session, "sagas")
            rows = (await session.exec(select(table).order_by(table.c.subscription_id))).all()  # type: ignore[call-overload]
            head = await billing.store.head(session)
            assert await billing.projector.position_of(session, "sagas") == head
            assert await billing.projector.catch_up(session) == 0
        assert [(r.subscription_id, r.state, r.version) for r in rows] == [
            ("sub_after000001", "awaiting_payment", 2),
            ("sub_before00001", "awaiting_activation", 4),
            ("sub_before00002", "awaiting_payment", 2),
        ]
        await asyncio.to_thread(alembic.downgrade, alembic_config(MIGRATIONS, url), "0001")
        async with sessions() as session:
            assert await Projector(store).position_of(session, "sagas") == 0  # its row is gone
    finally:
        await engine.dispose()


async def test_a_replayed_timeout_or_rejection_starts_no_compensation(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    billing = new_billing()
    saga = SagaHandlers(billing, billing.metrics, NoProvider)  # type: ignore[arg-type]
    await start(billing, sessions, "sub_replayed0001", payment_id="pay_replayed0001")
    replayed = MessageContext(is_replay=True)
    rejection = new_event(
        routing_key="subscription.activation_rejected.v1",
        source="/services/identity",
        data=SubscriptionActivationRejectedV1(
            payment_id="pay_replayed0001",
            user_id="usr_sagatest01",
            plan="starter",
            reason="unknown_user",
            rejected_at=AT,
        ),
    )
    with context.use(replayed):
        await as_the_runtime(
            sessions, saga.on_step, command("activation_timeout", "sub_replayed0001")
        )
        await as_the_runtime(sessions, saga.on_activation_rejected, rejection)
    async with sessions() as session:
        loaded = await billing.load(session, "sub_replayed0001")
    assert (loaded.saga.state, loaded.version) == ("awaiting_activation", 4)
    with context.use(MessageContext(is_replay=True, replay_forced=True)):  # the operator insists
        await as_the_runtime(
            sessions, saga.on_step, command("activation_timeout", "sub_replayed0001")
        )
    async with sessions() as session:
        assert (await billing.load(session, "sub_replayed0001")).saga.state == "compensating"
