"""Webhook endpoints and their delivery log: ``/users/{user_id}/webhooks/…``.

Like the other notification routes, each acts on one user: the user themself
(``notifications:read`` to look, ``notifications:write`` to change) or anyone with
``users:admin`` too. An endpoint's secret is shown once, in the answer that made it (creation,
rotation), and never again; it is never logged.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import as_utc, now
from tributary.messaging.erasure import was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.notification.preferences import Category
from tributary.notification.schemas import UserIdPath, make_cursor, parse_cursor
from tributary.notification.webhook_models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tributary.notification.webhook_urls import MAX_URL_LENGTH, Refused
from tributary.notification.webhooks import (
    Webhooks,
    categories_of,
    delete_endpoint,
    lock_endpoint,
)
from tributary.service.app import SessionDep, UowDep
from tributary.service.auth import require
from tributary.service.limits import rate_limit
from tributary.service.problems import conflict, invalid, not_found

router = APIRouter(tags=["webhooks"])

READ = require("notifications:read", owner="user_id")
WRITE = require("notifications:write", owner="user_id")
SENDS = rate_limit("webhooks", per_key="30/minute")
"""Registering or re-pointing an endpoint resolves a name; a re-send makes a request: both
are counted per API key (``TRIBUTARY_RATE_WEBHOOKS`` replaces the rate)."""

WebhookIdPath = Annotated[
    str, Path(pattern=r"^wh_[A-Za-z0-9]{8,40}$", description="The endpoint (`wh_…`)")
]
DeliveryIdPath = Annotated[
    str,
    Path(
        pattern=r"^msg_[A-Za-z0-9]{8,40}$",
        description="The delivery (`msg_…`, its `webhook-id` header)",
    ),
]
Categories = Annotated[
    list[Category] | None,
    Field(
        min_length=1,
        max_length=4,
        description="Only notifications of these categories; null (the default): all",
    ),
]


def webhooks_of(request: Request) -> Webhooks:
    found: Webhooks = request.app.state.webhooks
    return found


# -- bodies ------------------------------------------------------------------------------------


class EndpointCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://hooks.example.com/tributary",
                    "description": "CI bot",
                    "categories": ["reports", "mentions"],
                }
            ]
        },
    )

    url: str = Field(
        min_length=8,
        max_length=MAX_URL_LENGTH,
        description="HTTPS; its host must resolve to public addresses only",
    )
    description: str | None = Field(default=None, max_length=200)
    categories: Categories = None


class EndpointUpdate(BaseModel):
    """What to change; what is left out stays."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"enabled": True}]})

    enabled: StrictBool | None = Field(
        default=None,
        description="true enables a disabled endpoint (and restarts its failure clock)",
    )
    url: str | None = Field(default=None, min_length=8, max_length=MAX_URL_LENGTH)
    description: str | None = Field(default=None, max_length=200)
    categories: Categories = None


class EndpointPublic(BaseModel):
    id: str
    url: str
    description: str | None
    categories: list[Category] | None = Field(description="null: every category")
    enabled: bool
    disabled_reason: Literal["gone", "failing", "user"] | None = Field(
        description="gone: it answered 410; failing: no success for the disable period; "
        "user: switched off"
    )
    disabled_at: datetime | None
    failing_since: datetime | None = Field(
        description="The first failed attempt since the last success"
    )
    last_success_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="Until then deliveries are signed with the previous secret too"
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: WebhookEndpoint) -> EndpointPublic:
        until = row.previous_secret_until
        return cls(
            id=row.id,
            url=row.url,
            description=row.description,
            categories=categories_of(row),
            enabled=row.enabled,
            disabled_reason=row.disabled_reason,  # type: ignore[arg-type]  # written as such
            disabled_at=row.disabled_at,
            failing_since=row.failing_since,
            last_success_at=row.last_success_at,
            previous_secret_expires_at=until if until and as_utc(until) > now() else None,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class EndpointWithSecret(EndpointPublic):
    secret: str = Field(
        description="`whsec_…`: verifies the signatures. Shown only now: keep it safe"
    )


class EndpointList(BaseModel):
    items: list[EndpointPublic]


class AttemptPublic(BaseModel):
    at: datetime
    trigger: Literal["scheduled", "manual"]
    number: int = Field(description="The scheduled attempt's number, or the re-send's")
    succeeded: bool
    status_code: int | None = Field(description="The endpoint's answer (none: no answer)")
    error: str | None = Field(
        description="Why there was no answer: timeout, connect_error, forbidden_address, "
        "unresolvable, invalid_url, request_error"
    )
    detail: str | None
    duration_ms: int | None = Field(description="None when no request was made")

    @classmethod
    def of(cls, row: WebhookAttempt) -> AttemptPublic:
        manual = row.job.startswith("r")
        return cls(
            at=row.attempted_at,
            trigger="manual" if manual else "scheduled",
            number=int(row.job.removeprefix("r")),
            succeeded=row.succeeded,
            status_code=row.status_code,
            error=row.error,
            detail=row.detail,
            duration_ms=row.duration_ms,
        )


class DeliveryPublic(BaseModel):
    id: str = Field(description="The `webhook-id` of every attempt")
    category: Category
    status: Literal["pending", "succeeded", "failed"]
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="When the next scheduled attempt is due")
    payload: dict[str, Any] = Field(description="The body sent (and signed)")
    attempts: list[AttemptPublic] = Field(description="Oldest first")

    @classmethod
    def of(cls, row: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
        return cls(
            id=row.id,
            category=row.category,  # type: ignore[arg-type]  # written from Category only
            status=row.status,  # type: ignore[arg-type]
            created_at=row.created_at,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            payload=json.loads(row.payload),
            attempts=[AttemptPublic.of(a) for a in attempts],
        )


class DeliveryPage(BaseModel):
    items: list[DeliveryPublic] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page"
    )


class Resent(BaseModel):
    delivery: DeliveryPublic
    attempt: int = Field(description="The re-send's number (trigger `manual`)")


# -- helpers -----------------------------------------------------------------------------------


async def _known(session: AsyncSession, user_id: str) -> None:
    if await was_erased(session, user_id):
        raise not_found(
            f"There is no user {user_id}.", field="path.user_id", message="no such user"
        )


async def _endpoint(session: AsyncSession, user_id: str, webhook_id: str) -> WebhookEndpoint:
    row = await session.get(WebhookEndpoint, webhook_id)
    if row is None or row.user_id != user_id:
        raise not_found(
            f"The user has no webhook endpoint {webhook_id}.",
            field="path.webhook_id",
            message="no such webhook endpoint",
        )
    return row


async def _locked(uow: UnitOfWork, user_id: str, webhook_id: str) -> WebhookEndpoint:
    """The endpoint, locked against attempts and other changes until the commit."""
    await lock_endpoint(uow.session, webhook_id)
    row = await uow.session.get(WebhookEndpoint, webhook_id, populate_existing=True)
    if row is None or row.user_id != user_id:
        raise not_found(
            f"The user has no webhook endpoint {webhook_id}.",
            field="path.webhook_id",
            message="no such webhook endpoint",
        )
    return row


async def _vetted(webhooks: Webhooks, url: str, field: str) -> None:
    try:
        await webhooks.vet(url)
    except Refused as refused:
        raise invalid(field, refused.message, refused.reason) from None


async def _attempts(session: AsyncSession, ids: list[str]) -> dict[str, list[WebhookAttempt]]:
    found: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    if not ids:
        return found
    rows = await session.exec(
        select(WebhookAttempt)
        .where(col(WebhookAttempt.delivery_id).in_(ids))
        .order_by(col(WebhookAttempt.seq))
    )
    for row in rows.all():
        found[row.delivery_id].append(row)
    return found


# -- routes ------------------------------------------------------------------------------------


@router.post("/users/{user_id}/webhooks", dependencies=[WRITE, SENDS], status_code=201)
async def create_webhook(
    request: Request, uow: UowDep, user_id: UserIdPath, body: EndpointCreate
) -> EndpointWithSecret:
    """Register an endpoint. The answer carries its signing secret, shown only this once.

    The URL must be `https` and its host must resolve to public addresses only (422 with the
    reason otherwise; loopback and listed networks only where the settings allow them).
    """
    webhooks = webhooks_of(request)
    await _known(uow.session, user_id)
    await _vetted(webhooks, body.url, "body.url")
    count = (
        await uow.session.exec(
            select(func.count())
            .select_from(WebhookEndpoint)
            .where(col(WebhookEndpoint.user_id) == user_id)
        )
    ).one()
    if count >= webhooks.per_user:
        raise conflict(
            f"A user may register at most {webhooks.per_user} webhook endpoints.",
            field="body.url",
            message="too many endpoints",
        )
    endpoint, secret = webhooks.new_endpoint(user_id, body.url, body.description, body.categories)
    uow.session.add(endpoint)
    await uow.session.flush()
    answer = EndpointWithSecret(**EndpointPublic.of(endpoint).model_dump(), secret=secret)
    await uow.commit()
    return answer


@router.get("/users/{user_id}/webhooks", dependencies=[READ])
async def list_webhooks(session: SessionDep, user_id: UserIdPath) -> EndpointList:
    """The user's endpoints, oldest first (secrets are never shown again)."""
    rows = await session.exec(
        select(WebhookEndpoint)
        .where(col(WebhookEndpoint.user_id) == user_id)
        .order_by(col(WebhookEndpoint.created_at), col(WebhookEndpoint.id))
    )
    return EndpointList(items=[EndpointPublic.of(r) for r in rows.all()])


@router.get("/users/{user_id}/webhooks/{webhook_id}", dependencies=[READ])
async def get_webhook(
    session: SessionDep, user_id: UserIdPath, webhook_id: WebhookIdPath
) -> EndpointPublic:
    return EndpointPublic.of(await _endpoint(session, user_id, webhook_id))


@router.patch("/users/{user_id}/webhooks/{webhook_id}", dependencies=[WRITE, SENDS])
async def update_webhook(
    request: Request,
    uow: UowDep,
    user_id: UserIdPath,
    webhook_id: WebhookIdPath,
    body: EndpointUpdate,
) -> EndpointPublic:
    """Change an endpoint. `{"enabled": true}` enables one the service disabled (it answered
    410, or kept failing) and restarts its failure clock; deliveries that ended while it was
    disabled are not sent again by themselves (re-send them)."""
    webhooks = webhooks_of(request)
    if body.url is not None:  # before the lock: resolving takes time
        await _vetted(webhooks, body.url, "body.url")
    endpoint = await _locked(uow, user_id, webhook_id)
    given = body.model_fields_set
    if body.url is not None:
        endpoint.url = body.url
    if "description" in given:
        endpoint.description = body.description
    if "categories" in given:
        endpoint.categories = (
            None if body.categories is None else ",".join(dict.fromkeys(body.categories))
        )
    if body.enabled is not None:
        webhooks.set_enabled(endpoint, body.enabled)
    endpoint.updated_at = now()
    uow.session.add(endpoint)
    await uow.session.flush()
    answer = EndpointPublic.of(endpoint)
    await uow.commit()
    return answer


@router.delete("/users/{user_id}/webhooks/{webhook_id}", dependencies=[WRITE], status_code=204)
async def delete_webhook(uow: UowDep, user_id: UserIdPath, webhook_id: WebhookIdPath) -> Response:
    """Remove an endpoint with its delivery log; attempts still scheduled do nothing."""
    await _locked(uow, user_id, webhook_id)
    await delete_endpoint(uow.session, webhook_id)
    await uow.commit()
    return Response(status_code=204)


@router.post("/users/{user_id}/webhooks/{webhook_id}/rotate-secret", dependencies=[WRITE])
async def rotate_secret(
    request: Request, uow: UowDep, user_id: UserIdPath, webhook_id: WebhookIdPath
) -> EndpointWithSecret:
    """A new signing secret, shown only in this answer. Until `previous_secret_expires_at`
    deliveries carry two signatures, one per secret, so the receiver can switch at leisure."""
    webhooks = webhooks_of(request)
    endpoint = await _locked(uow, user_id, webhook_id)
    secret = webhooks.rotate(endpoint)
    uow.session.add(endpoint)
    await uow.session.flush()
    answer = EndpointWithSecret(**EndpointPublic.of(endpoint).model_dump(), secret=secret)
    await uow.commit()
    return answer


@router.get("/users/{user_id}/webhooks/{webhook_id}/deliveries", dependencies=[READ])
async def list_deliveries(
    session: SessionDep,
    user_id: UserIdPath,
    webhook_id: WebhookIdPath,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=100, description="`next_cursor` of the previous page")
    ] = None,
    status: Annotated[
        Literal["pending", "succeeded", "failed"] | None, Query(description="only these")
    ] = None,
) -> DeliveryPage:
    """The endpoint's delivery log, newest first: each delivery with every attempt (time,
    status code or error, duration)."""
    await _endpoint(session, user_id, webhook_id)
    query = select(WebhookDelivery).where(col(WebhookDelivery.endpoint_id) == webhook_id)
    if cursor is not None:
        try:
            before = parse_cursor(cursor)
        except ValueError:
            raise invalid("query.cursor", "is not a cursor this service issued", "cursor") from None
        query = query.where(col(WebhookDelivery.seq) < before)
    if status is not None:
        query = query.where(col(WebhookDelivery.status) == status)
    rows = list(
        (await session.exec(query.order_by(col(WebhookDelivery.seq).desc()).limit(limit + 1))).all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    attempts = await _attempts(session, [r.id for r in rows])
    last = rows[-1].seq if rows else None
    return DeliveryPage(
        items=[DeliveryPublic.of(r, attempts[r.id]) for r in rows],
        next_cursor=make_cursor(last) if more and last is not None else None,
    )


@router.post(
    "/users/{user_id}/webhooks/{webhook_id}/deliveries/{delivery_id}/resend",
    dependencies=[WRITE, SENDS],
    status_code=202,
)
async def resend_delivery(
    request: Request,
    uow: UowDep,
    user_id: UserIdPath,
    webhook_id: WebhookIdPath,
    delivery_id: DeliveryIdPath,
) -> Resent:
    """Send a delivery again, now (the same body and `webhook-id`, a fresh signature), whatever
    became of it. It is attempted once; scheduled attempts still due go on. 409 while the
    endpoint is disabled."""
    webhooks = webhooks_of(request)
    endpoint = await _locked(uow, user_id, webhook_id)
    delivery = (
        await uow.session.exec(
            select(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery_id)
            .where(col(WebhookDelivery.endpoint_id) == webhook_id)
        )
    ).first()
    if delivery is None:
        raise not_found(
            f"The endpoint has no delivery {delivery_id}.",
            field="path.delivery_id",
            message="no such delivery",
        )
    if not endpoint.enabled:
        raise conflict(
            "The endpoint is disabled: enable it first (PATCH with enabled true).",
            field="path.webhook_id",
            message="disabled",
        )
    number = await webhooks.resend(uow, delivery)
    attempts = await _attempts(uow.session, [delivery.id])
    answer = Resent(
        delivery=DeliveryPublic.of(delivery, attempts[delivery.id]),
        attempt=int(number.removeprefix("r")),
    )
    await uow.commit()
    return answer
