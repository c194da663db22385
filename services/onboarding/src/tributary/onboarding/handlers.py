from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import delete
from sqlmodel import col

from tributary.contracts.envelope import Event
from tributary.contracts.events import UserCreatedV2, UserErasedV1, WorkspaceCreatedV1
from tributary.messaging.bus import Handlers
from tributary.messaging.erasure import remember_erased, was_erased
from tributary.messaging.uow import UnitOfWork
from tributary.onboarding.models import Workspace

log = logging.getLogger("tributary.onboarding.handlers")


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
    user = event.data
    if await was_erased(uow.session, user.user_id):
        return  # arrived after the user's erasure (events are not ordered): nothing to make
    if await uow.session.get(Workspace, Workspace.for_owner(user.user_id, "").id) is not None:
        return  # already made (e.g. the same user announced under another event id)
    workspace = Workspace.for_owner(user.user_id, f"{user.given_name}'s workspace"[:200])
    uow.session.add(workspace)
    uow.outbox.add(
        WorkspaceCreatedV1(
            workspace_id=workspace.id,
            owner_id=workspace.owner_id,
            name=workspace.name,
            created_at=datetime.now(UTC),
        ),
        subject=f"workspaces/{workspace.id}",
        idempotency_key=f"workspace.created:{workspace.id}",
    )


async def on_user_erased(event: Event[UserErasedV1], uow: UnitOfWork) -> None:
    """Delete the user's workspace (its name holds their given name), remember the user as
    erased, and remove them from the outbox and the DLQ. Runs again harmlessly on a replay
    (never suppressed: an erasure is not a side effect to skip)."""
    user_id = event.data.user_id
    # every workspace.created about the user names the owner: the id finds them all
    erased = await uow.erase_person(user_id)
    result = await uow.session.exec(delete(Workspace).where(col(Workspace.owner_id) == user_id))
    await remember_erased(uow.session, user_id)
    log.info(
        "user %s erased: %d workspace(s), %d outbox row(s), %d dead letter(s) removed",
        user_id,
        result.rowcount or 0,
        erased.outbox,
        erased.dead_letters.removed,
    )


HANDLERS: Handlers = {UserCreatedV2: on_user_created, UserErasedV1: on_user_erased}
