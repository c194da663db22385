"""Preferences and the in-app inbox: ``/users/{user_id}/…``.

Every route acts on one user: the user themself (``notifications:read`` or
``notifications:write``, granted to every user's keys) or anyone with ``users:admin`` too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import delete, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import now
from tributary.messaging.erasure import was_erased
from tributary.notification.models import Notification, Preference
from tributary.notification.preferences import (
    CATEGORIES,
    CHANNELS,
    Category,
    ChannelName,
    critical_cells,
    decide,
    is_critical,
)
from tributary.notification.quiet import set_quiet_hours, window_for
from tributary.notification.schemas import (
    MAX_SEQ,
    MarkedRead,
    NotificationPage,
    NotificationPublic,
    PreferencesPublic,
    PreferencesUpdate,
    QuietHours,
    UserIdPath,
    make_cursor,
    parse_cursor,
)
from tributary.notification.store import choices_of, lock_inbox
from tributary.service.app import SessionDep, UowDep
from tributary.service.auth import require
from tributary.service.problems import Problem, field_error, invalid, not_found

router = APIRouter(tags=["notifications"])

READ = require("notifications:read", owner="user_id")
WRITE = require("notifications:write", owner="user_id")


async def _known(session: AsyncSession, user_id: str) -> None:
    """404 for an erased user: nothing about them is shown, nothing stored again."""
    if await was_erased(session, user_id):
        raise not_found(
            f"There is no user {user_id}.", field="path.user_id", message="no such user"
        )


async def _preferences(session: AsyncSession, user_id: str) -> PreferencesPublic:
    choices = await choices_of(session, user_id)
    decided = {(c, ch): decide(c, ch, choices) for c in CATEGORIES for ch in CHANNELS}
    return PreferencesPublic(
        user_id=user_id,
        categories={c: {ch: decided[(c, ch)][0] for ch in CHANNELS} for c in CATEGORIES},
        sources={c: {ch: decided[(c, ch)][1] for ch in CHANNELS} for c in CATEGORIES},
        critical=critical_cells(),
        quiet_hours=QuietHours.of(await window_for(session, user_id)),
    )


@router.get("/users/{user_id}/preferences", dependencies=[READ])
async def get_preferences(session: SessionDep, user_id: UserIdPath) -> PreferencesPublic:
    """Which channels each category of notification uses for the user, and why; their quiet
    hours.

    Order of precedence: `critical` (account in-app: always on) > the user's choice > the
    default (every channel on but billing email; a webhook needs an endpoint, email an
    address).
    """
    await _known(session, user_id)
    return await _preferences(session, user_id)


@router.put("/users/{user_id}/preferences", dependencies=[WRITE])
async def put_preferences(
    uow: UowDep, user_id: UserIdPath, body: PreferencesUpdate
) -> PreferencesPublic:
    """Replace the user's choices: each category and channel given is stored as chosen, the
    others go back to their default; `quiet_hours` as given (left out or null: none). Account
    in-app is critical: switching it off is refused (422); switching it on changes nothing.

    Notifications held by quiet hours that now end sooner (or that have none any more) are
    delivered at the new end (at once)."""
    await _known(uow.session, user_id)
    chosen: dict[tuple[Category, ChannelName], bool] = {}
    refused = []
    for category in CATEGORIES:
        switches = getattr(body.categories, category)
        if switches is None:
            continue
        for channel in CHANNELS:
            value = getattr(switches, channel)
            if value is None:
                continue
            if is_critical(category, channel):
                if value is False:
                    refused.append(
                        field_error(
                            f"body.categories.{category}.{channel}",
                            f"{category} {channel} notifications are critical and cannot be "
                            "switched off",
                            "critical",
                        )
                    )
                continue
            chosen[(category, channel)] = value
    if refused:
        raise Problem(
            422,
            "Critical notifications cannot be switched off: see errors for each field.",
            slug="validation-error",
            errors=refused,
        )
    await lock_inbox(uow.session, user_id)  # one writer per user: PUTs and handlers in turn
    await uow.session.exec(delete(Preference).where(col(Preference.user_id) == user_id))
    stamp = now()
    for (cat, chan), value in chosen.items():
        uow.session.add(
            Preference(user_id=user_id, category=cat, channel=chan, enabled=value, updated_at=stamp)
        )
    await uow.session.flush()
    window = body.quiet_hours.window() if body.quiet_hours is not None else None
    await set_quiet_hours(uow, user_id, window)
    answer = await _preferences(uow.session, user_id)
    await uow.commit()
    return answer


@router.get("/users/{user_id}/notifications", dependencies=[READ])
async def list_notifications(
    session: SessionDep,
    user_id: UserIdPath,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=100, description="`next_cursor` of the previous page")
    ] = None,
    unread: Annotated[bool, Query(description="only notifications not read yet")] = False,
) -> NotificationPage:
    """The user's in-app notifications, newest first, a page at a time."""
    query = select(Notification).where(col(Notification.user_id) == user_id)
    if cursor is not None:
        try:
            before = parse_cursor(cursor)
        except ValueError:
            raise invalid("query.cursor", "is not a cursor this service issued", "cursor") from None
        query = query.where(col(Notification.seq) < before)
    if unread:
        query = query.where(col(Notification.read_at).is_(None))
    rows = list(
        (await session.exec(query.order_by(col(Notification.seq).desc()).limit(limit + 1))).all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return NotificationPage(
        items=[NotificationPublic.of(row) for row in rows],
        next_cursor=make_cursor(rows[-1].seq) if more else None,
    )


@router.post("/users/{user_id}/notifications/{notification_id}/read", dependencies=[WRITE])
async def mark_read(
    uow: UowDep,
    user_id: UserIdPath,
    notification_id: Annotated[int, Path(ge=1, le=MAX_SEQ)],
) -> NotificationPublic:
    """Mark one notification read (again: no change, the first time is kept)."""
    row = await uow.session.get(Notification, (user_id, notification_id))
    if row is None:
        raise not_found(
            f"The user has no notification {notification_id}.",
            field="path.notification_id",
            message="no such notification",
        )
    if row.read_at is None:
        row.read_at = now()
        uow.session.add(row)
        await uow.session.flush()
    answer = NotificationPublic.of(row)
    await uow.commit()
    return answer


@router.post("/users/{user_id}/notifications/read-all", dependencies=[WRITE])
async def mark_all_read(
    uow: UowDep,
    user_id: UserIdPath,
    up_to: Annotated[
        int | None,
        Query(ge=1, le=MAX_SEQ, description="only up to this id (what the user has seen)"),
    ] = None,
) -> MarkedRead:
    """Mark every unread notification of the user read (or those up to `up_to`)."""
    statement = (
        update(Notification)
        .where(col(Notification.user_id) == user_id)
        .where(col(Notification.read_at).is_(None))
    )
    if up_to is not None:
        statement = statement.where(col(Notification.seq) <= up_to)
    result = await uow.session.exec(statement.values(read_at=now()))
    await uow.commit()
    return MarkedRead(marked=result.rowcount or 0)
