"""Subscriptions with mixed lifecycles, written through billing's real write path: the
aggregate decides, ``Billing.save`` appends, indexes, stages the integration events and
updates the projections, a unit of work commits. For tests and the projection benchmark."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto
from tributary.billing.commands import Billing
from tributary.billing.events import CURRENT_VERSIONS, DomainEvent
from tributary.billing.eventstore import EventStore
from tributary.billing.metrics import BillingMetrics
from tributary.billing.models import DataKey
from tributary.billing.plans import PRICES, Plan
from tributary.billing.projections import Projection, Projector
from tributary.billing.subscription import Subscription
from tributary.billing.upcasting import UPCASTERS
from tributary.messaging.uow import UnitOfWork

AT = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
SOURCE = "/services/billing"


def billing_with(projections: tuple[Projection, ...] | None = None) -> Billing:
    """Billing as the service makes it (its own projections unless others are given)."""
    store = EventStore(UPCASTERS, CURRENT_VERSIONS)
    projector = Projector(store) if projections is None else Projector(store, projections)
    return Billing(store, projector, BillingMetrics(), retries=5)


def script(rng: random.Random) -> list[str]:
    """The commands one subscription goes through after its request."""
    r = rng.random()
    if r < 0.05:
        return ["cancel"]
    if r < 0.10:
        return ["checkout_failed"]
    steps = ["checkout"]
    r = rng.random()
    if r < 0.15:
        return [*steps, "failed", *(["cancel"] if rng.random() < 0.5 else [])]
    if r < 0.18:  # cancelled, then paid all the same: a late payment, refunded in full
        return [*steps, "cancel", "paid", "refund_full"]
    steps.append("paid")
    if rng.random() < 0.8:
        steps.append("activate")
    r = rng.random()
    if r < 0.15:
        steps.append("refund_part")
    elif r < 0.25:
        steps.append("refund_full")
    return steps


def decide(subscription: Subscription, step: str, n: int, at: datetime) -> list[DomainEvent]:
    sid = subscription.id
    if step == "checkout":
        return subscription.record_checkout(f"co_{sid[4:]}", f"https://pay.example/{sid}", at)
    if step == "checkout_failed":
        return subscription.checkout_failed("provider unavailable", at)
    if step == "failed":
        return subscription.payment_failed(
            payment_id=f"pay_{sid[4:]}", provider_event_id=f"evt_{n}", reason="declined", at=at
        )
    if step == "paid":
        return subscription.payment_succeeded(
            payment_id=f"pay_{sid[4:]}",
            provider_payment_id=f"pi_{sid[4:]}",
            provider_event_id=f"evt_{n}",
            paid_at=at,
        )
    if step == "activate":
        return subscription.confirm_activation(
            activation_id=f"act_{sid[4:]}", event_id=f"e{n}", at=at
        )
    if step in ("refund_part", "refund_full"):
        amount = subscription.paid_cents - subscription.refunded_cents
        if step == "refund_part":
            amount = max(1, amount // 3)
        return subscription.refunded(
            refund_id=f"re_{sid[4:]}_{n}",
            provider_event_id=f"evt_{n}",
            amount_cents=amount,
            reason=None,
            at=at,
        )
    return subscription.cancel(at)


@dataclass
class Workload:
    """Appends subscriptions' events through ``billing`` until a number of events is reached.

    Deterministic for a seed (ids and choices; the store's timestamps are the clock's)."""

    sessions: async_sessionmaker[AsyncSession]
    billing: Billing
    seed: int = 1
    users: int = 20
    per_unit: int = 1
    """Subscriptions per unit of work (one transaction)."""
    rng: random.Random = field(init=False)
    keys: list[tuple[str, DataKey]] = field(default_factory=list)
    made: int = 0
    appended: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def _keys(self) -> None:
        if not self.keys:
            for u in range(self.users):
                user_id = f"usr_w{self.seed:04d}u{u:05d}"
                self.keys.append((user_id, await crypto.ensure_key(self.sessions, user_id)))

    async def append(self, events: int) -> int:
        """Append exactly ``events`` more events (lifecycles cut short at the end, the rest
        made up with bare requests); how many subscriptions were touched."""
        await self._keys()
        budget = events
        touched = 0
        while budget > 0:
            async with UnitOfWork(self.sessions(), SOURCE) as uow:
                for _ in range(self.per_unit):
                    if budget <= 0:
                        break
                    budget -= await self._one(uow, budget)
                    touched += 1
                await uow.commit()
        self.appended += events
        return touched

    async def _one(self, uow: UnitOfWork, budget: int) -> int:
        """One subscription: requested, then its script as far as ``budget`` allows."""
        self.made += 1
        sid = f"sub_w{self.seed:04d}{self.made:015d}"
        user_id, key = self.keys[self.rng.randrange(len(self.keys))]
        plan: Plan = self.rng.choice(["starter", "pro"])
        price = PRICES[plan]
        at = AT + timedelta(seconds=self.made)
        subscription = Subscription(sid)
        sealed = crypto.seal(key, user_id, crypto.aad(sid, "user"))
        first = subscription.request(
            user=sealed, plan=plan, amount_cents=price.amount_cents, currency=price.currency, at=at
        )
        await self.billing.save(uow, subscription, first)
        spent = 1
        for n, step in enumerate(script(self.rng)):
            decided = decide(subscription, step, n, at + timedelta(minutes=n + 1))
            if spent + len(decided) > budget:
                break
            await self.billing.save(uow, subscription, decided)
            spent += len(decided)
        return spent
