from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlmodel import select

from tributary.contracts.envelope import new_event
from tributary.contracts.events import UserCreatedV2, WorkspaceCreatedV1
from tributary.onboarding.handlers import on_user_created
from tributary.onboarding.models import Workspace
from tributary.service.testing import fake_uow


def user_created(user_id: str = "usr_0123456789") -> Any:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        data=UserCreatedV2(
            user_id=user_id,
            email="ada@example.com",
            given_name="Ada",
            family_name="Lovelace",
            plan="free",
            locale="en-GB",
            created_at=datetime.now(UTC),
        ),
    )


async def test_a_new_user_gets_a_workspace_and_it_is_announced(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await on_user_created(user_created(), cast(Any, uow))
        workspaces = (await uow.session.exec(select(Workspace))).all()
        assert [w.owner_id for w in workspaces] == ["usr_0123456789"]
        [(payload, meta)] = uow.outbox.events
        assert isinstance(payload, WorkspaceCreatedV1)
        assert payload.workspace_id == workspaces[0].id
        assert meta["subject"] == f"workspaces/{payload.workspace_id}"


async def test_the_same_user_announced_twice_keeps_one_workspace(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await on_user_created(user_created(), cast(Any, uow))
        await uow.session.flush()
        await on_user_created(user_created(), cast(Any, uow))
        assert len((await uow.session.exec(select(Workspace))).all()) == 1
        assert len(uow.outbox.events) == 1


def test_workspace_ids_derive_from_the_owner() -> None:
    assert (
        Workspace.for_owner("usr_a1234567", "x").id == Workspace.for_owner("usr_a1234567", "y").id
    )
    assert (
        Workspace.for_owner("usr_a1234567", "x").id != Workspace.for_owner("usr_b1234567", "x").id
    )
