from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import delete, exists
from sqlmodel import col, select

from tributary.contracts.envelope import Event
from tributary.contracts.events import UserCreatedV2, UserErasedV1, WorkspaceCreatedV1
from tributary.messaging.bus import Handlers
from tributary.messaging.erasure import ErasedUser, remember_erased
from tributary.messaging.uow import UnitOfWork
from tributary.onboarding.models import Workspace

log = logging.getLogger("tributary.onboarding.handlers")


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
    user = event.data
    workspace_id = Workspace.id_for(user.user_id)
    session = uow.session
    # made earlier in this transaction (a group commit handles many events in one): still
    # pending, as the check below does not flush
    if any(isinstance(o, Workspace) and o.id == workspace_id for o in session.new):
        return
    # both checks in one statement, without flushing the rows earlier events of the batch
    # staged: they are inserted together at commit (one statement per table, not per event)
    with session.no_autoflush:
        erased, made = (
            await session.exec(
                select(
                    exists().where(col(ErasedUser.user_id) == user.user_id),
                    exists().where(col(Workspace.id) == workspace_id),
                )
            )
        ).one()
    if erased:
        return  # arrived after the user's erasure (events are not ordered): nothing to make
    if made:
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
