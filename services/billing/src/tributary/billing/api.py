"""Subscriptions (a user's own: ``billing:read`` / ``billing:write``; anyone's with
``users:admin`` too), revenue (``revenue:read``) and the subscriptions' sagas
(``sagas:read``)."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from sqlalchemy import ColumnElement, Row, Select, select, tuple_
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing import crypto
from tributary.billing.commands import Billing
from tributary.billing.eventstore import ConcurrencyConflict
from tributary.billing.plans import PRICES
from tributary.billing.provider import ProviderClient, ProviderError, ProviderRefused
from tributary.billing.saga import SagaState
from tributary.billing.schemas import (
    Revenue,
    RevenueLine,
    SagaPage,
    SagaPublic,
    SagaRow,
    SubscriptionCreate,
    SubscriptionPage,
    SubscriptionPublic,
    SubscriptionRow,
    UserId,
    make_cursor,
    parse_cursor,
)
from tributary.billing.subscription import InvalidTransition, Status, Subscription
from tributary.messaging.bus import Bus
from tributary.messaging.db import now
from tributary.messaging.erasure import was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.service.app import BusDep, SessionDep
from tributary.service.auth import Principal, not_owner, require
from tributary.service.problems import Problem, conflict, invalid, not_found, problem_responses

log = logging.getLogger("tributary.billing.api")

router = APIRouter(tags=["subscriptions"])

SubscriptionId = Annotated[str, Path(pattern=r"^sub_[A-Za-z0-9]{8,40}$")]
_IF_MATCH = re.compile(r'^(?:W/)?"?([0-9]{1,9})"?$')


def _billing(request: Request) -> Billing:
    billing: Billing = request.app.state.billing
    return billing


def _provider(request: Request) -> ProviderClient:
    provider: ProviderClient = request.app.state.provider
    return provider


@asynccontextmanager
async def _reading(request: Request) -> AsyncIterator[AsyncSession]:
    """A read session for a route that writes afterwards, closed before it does: a request
    holding its read connection across the provider call and the unit of work (a second
    connection) would, in a burst, leave every pooled connection held by a request waiting
    for another one, until the pool's timeout."""
    async with request.app.state.sessions() as session:
        yield session


def _etag(response: Response, subscription: Subscription) -> None:
    response.headers["ETag"] = f'"{subscription.version}"'


def _hidden(subscription_id: str) -> Problem:
    return not_found(
        f"There is no subscription {subscription_id}.",
        field="path.subscription_id",
        message="no such subscription",
    )


async def _visible(
    billing: Billing, session: AsyncSession, subscription_id: str, principal: Principal
) -> Subscription:
    """The subscription if the caller may see it; another user's answers 404 as if absent."""
    subscription = await billing.load(session, subscription_id)
    if not subscription.exists or not (
        principal.is_admin or subscription.user_id == principal.subject
    ):
        raise _hidden(subscription_id)
    return subscription


@router.post(
    "/subscriptions",
    status_code=201,
    responses=problem_responses(403, 404, 502, 503),
)
async def create_subscription(
    request: Request,
    response: Response,
    bus: BusDep,
    principal: Annotated[Principal, require("billing:write")],
    body: SubscriptionCreate,
) -> SubscriptionPublic:
    """Start a paid plan: a subscription for the plan's price, and a checkout at the payment
    provider. Pay at `pay_url`; the provider's webhook moves the subscription on.

    For yourself with `billing:write`; for another user with `users:admin` too. The
    provider unreachable or refusing: 503 / 502, and the subscription is `checkout_failed`.
    """
    user_id = body.user_id or principal.subject
    if user_id != principal.subject and not principal.is_admin:
        raise not_owner()
    async with _reading(request) as session:
        erased = await was_erased(session, user_id)
    if erased:
        raise not_found(f"There is no user {user_id}.", field="body.user_id")
    billing = _billing(request)
    key = await crypto.ensure_key(request.app.state.sessions, user_id)
    subscription_id = f"sub_{secrets.token_hex(12)}"
    price = PRICES[body.plan]

    async def requested(uow: UnitOfWork) -> None:
        subscription = Subscription(subscription_id)
        user = crypto.seal(key, user_id, crypto.aad(subscription_id, "user"))
        decided = subscription.request(
            user=user,
            plan=body.plan,
            amount_cents=price.amount_cents,
            currency=price.currency,
            at=now(),
        )
        await billing.save(uow, subscription, decided)

    await billing.execute(bus, "request", requested)
    try:
        checkout = await _provider(request).create_checkout(
            subscription_id=subscription_id,
            amount_cents=price.amount_cents,
            currency=price.currency,
            plan=body.plan,
        )
    except ProviderError as exc:
        await _record(bus, billing, subscription_id, "checkout_failed", reason=str(exc))
        status = 502 if isinstance(exc, ProviderRefused) else 503
        raise Problem(
            status,
            f"The payment provider could not make a checkout; subscription {subscription_id} "
            "is checkout_failed. Try again later.",
            headers={"Retry-After": "10"} if status == 503 else None,
        ) from None
    subscription = await _record(
        bus,
        billing,
        subscription_id,
        "record_checkout",
        checkout_id=checkout.id,
        pay_url=checkout.pay_url,
    )
    response.headers["Location"] = f"/subscriptions/{subscription_id}"
    _etag(response, subscription)
    return SubscriptionPublic.of(subscription)


async def _record(
    bus: Bus, billing: Billing, subscription_id: str, command: str, **given: str
) -> Subscription:
    async def run(uow: UnitOfWork) -> Subscription:
        subscription = await billing.load(uow.session, subscription_id)
        if command == "record_checkout":
            decided = subscription.record_checkout(given["checkout_id"], given["pay_url"], now())
        else:
            decided = subscription.checkout_failed(given["reason"], now())
        await billing.save(uow, subscription, decided)
        return subscription

    return await billing.execute(bus, command, run)


async def _page(
    session: AsyncSession,
    query: Select[Any],
    at: ColumnElement[Any],
    key: ColumnElement[Any],
    cursor: str | None,
    limit: int,
) -> tuple[list[Row[Any]], bool]:
    """One page of ``query``, newest ``at`` first (ties by ``key``), after ``cursor``; and
    whether there is more."""
    if cursor is not None:
        try:
            before = parse_cursor(cursor)
        except ValueError:
            raise invalid("query.cursor", "is not a cursor this service issued", "cursor") from None
        query = query.where(tuple_(at, key) < before)
    query = query.order_by(at.desc(), key.desc()).limit(limit + 1)
    rows = list((await session.exec(query)).all())  # type: ignore[call-overload]
    return rows[:limit], len(rows) > limit


@router.get("/subscriptions", responses=problem_responses(403, 422))
async def list_subscriptions(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, require("billing:read")],
    user_id: Annotated[UserId | None, Query(description="default: the caller")] = None,
    status: Annotated[Status | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> SubscriptionPage:
    """A user's subscriptions, newest first, from the read model (`status` filters):
    your own with `billing:read`, another user's with `users:admin` too."""
    user_id = user_id or principal.subject
    if user_id != principal.subject and not principal.is_admin:
        raise not_owner()
    table = await _billing(request).projector.table_of(session, "subscriptions")
    query = select(table).where(table.c.user_id == user_id)
    if status is not None:
        query = query.where(table.c.status == status)
    rows, more = await _page(
        session, query, table.c.created_at, table.c.subscription_id, cursor, limit
    )
    items = [SubscriptionRow.of(row) for row in rows]
    return SubscriptionPage(
        items=items,
        next_cursor=make_cursor(items[-1].created_at, items[-1].id) if more else None,
    )


@router.get("/subscriptions/{subscription_id}", responses=problem_responses(404))
async def get_subscription(
    request: Request,
    response: Response,
    session: SessionDep,
    principal: Annotated[Principal, require("billing:read")],
    subscription_id: SubscriptionId,
) -> SubscriptionPublic:
    """One subscription, from its event stream: state, version (also the `ETag`) and the
    history of its events. Another user's answers 404."""
    subscription = await _visible(_billing(request), session, subscription_id, principal)
    _etag(response, subscription)
    return SubscriptionPublic.of(subscription)


def _expected(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    found = _IF_MATCH.fullmatch(if_match.strip())
    if found is None:
        raise invalid("header.If-Match", "is not a version this service gave (an ETag)", "etag")
    return int(found.group(1))


@router.post("/subscriptions/{subscription_id}/cancel", responses=problem_responses(404, 409, 503))
async def cancel_subscription(
    request: Request,
    response: Response,
    bus: BusDep,
    principal: Annotated[Principal, require("billing:write")],
    subscription_id: SubscriptionId,
    if_match: Annotated[str | None, Header(alias="If-Match", max_length=20)] = None,
) -> SubscriptionPublic:
    """Cancel a subscription not paid for: its checkout is closed at the provider, it
    becomes `cancelled` and `subscription.cancelled` is emitted (again: no change).

    `If-Match: "<version>"` (the `ETag`) cancels only the version you saw: another change in
    between answers 409, as does a concurrent change. A paid subscription, or one whose
    payment is under way: 409.
    """
    billing = _billing(request)
    expected = _expected(if_match)
    async with _reading(request) as session:
        seen = await _visible(billing, session, subscription_id, principal)
    if seen.status == "pending_payment" and seen.checkout_id is not None:
        try:
            await _provider(request).expire_checkout(seen.checkout_id)
        except ProviderRefused:
            raise conflict(
                f"Subscription {subscription_id} is being paid, or is paid: it cannot be cancelled."
            ) from None
        except ProviderError:
            raise Problem(
                503,
                "The payment provider could not close the checkout; try again later.",
                headers={"Retry-After": "10"},
            ) from None

    async def cancel(uow: UnitOfWork) -> Subscription:
        subscription = await billing.load(uow.session, subscription_id)
        if expected is not None and subscription.version != expected:
            raise ConcurrencyConflict(subscription_id, expected, subscription.version)
        decided = subscription.cancel(now())
        await billing.save(uow, subscription, decided, expected_version=expected)
        return subscription

    try:
        subscription = await billing.execute(bus, "cancel", cancel, retry=False)
    except ConcurrencyConflict as exc:
        raise conflict(f"Subscription {subscription_id} changed meanwhile: {exc}.") from None
    except InvalidTransition as exc:
        raise conflict(str(exc)) from None
    _etag(response, subscription)
    return SubscriptionPublic.of(subscription)


@router.get("/revenue", tags=["revenue"], dependencies=[require("revenue:read")])
async def revenue(request: Request, session: SessionDep) -> Revenue:
    """Payments taken and refunds given, per plan and currency (the read model), and the
    event-store position the figures include."""
    projector = _billing(request).projector
    table = await projector.table_of(session, "revenue")
    rows = await session.exec(select(table).order_by(table.c.plan, table.c.currency))  # type: ignore[call-overload]
    lines = [
        RevenueLine(**row._mapping, net_cents=row.gross_cents - row.refunded_cents)
        for row in rows.all()
    ]
    position = await projector.position_of(session, "revenue")
    return Revenue(lines=lines, position=position)


@router.get(
    "/sagas/{subscription_id}",
    tags=["sagas"],
    dependencies=[require("sagas:read")],
    responses=problem_responses(404),
)
async def get_saga(
    request: Request, session: SessionDep, subscription_id: SubscriptionId
) -> SagaPublic:
    """A subscription's saga (payment → activation, or compensation), from its event stream:
    state, the subscription's status, why, every step with the time it was recorded, and the
    activation timeout still to come."""
    subscription = await _billing(request).load(session, subscription_id)
    if not subscription.exists:
        raise not_found(
            f"There is no saga {subscription_id}.",
            field="path.subscription_id",
            message="no such saga",
        )
    return SagaPublic.of(subscription)


@router.get("/sagas", tags=["sagas"], dependencies=[require("sagas:read")])
async def list_sagas(
    request: Request,
    session: SessionDep,
    state: Annotated[
        SagaState | None,
        Query(description="e.g. `compensating`: refunds not (yet) done, the stuck ones"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> SagaPage:
    """Sagas from the read model, most recently changed first (`state` filters)."""
    table = await _billing(request).projector.table_of(session, "sagas")
    query = select(table)
    if state is not None:
        query = query.where(table.c.state == state)
    rows, more = await _page(
        session, query, table.c.updated_at, table.c.subscription_id, cursor, limit
    )
    items = [SagaRow.of(row) for row in rows]
    return SagaPage(
        items=items,
        next_cursor=make_cursor(items[-1].updated_at, items[-1].id) if more else None,
    )
