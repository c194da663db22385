from __future__ import annotations

from datetime import UTC, datetime

from tributary.contracts.envelope import Event
from tributary.contracts.events import UserCreatedV2, WorkspaceCreatedV1
from tributary.messaging.bus import Handlers
from tributary.messaging.uow import UnitOfWork
from tributary.onboarding.models import Workspace


async def on_user_created(event: Event[UserCreatedV2], uow: UnitOfWork) -> None:
    user = event.data
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


HANDLERS: Handlers = {UserCreatedV2: on_user_created}
