from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import event
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


async def test_the_same_user_twice_in_one_group_commit_keeps_one_workspace(tmp_path: Path) -> None:
    # a group commit handles many events in one transaction, without a flush between them
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await on_user_created(user_created(), cast(Any, uow))
        await on_user_created(user_created(), cast(Any, uow))
        assert len((await uow.session.exec(select(Workspace))).all()) == 1
        assert len(uow.outbox.events) == 1


async def test_a_batch_of_sign_ups_inserts_its_workspaces_in_one_statement(tmp_path: Path) -> None:
    statements: list[tuple[str, bool]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        statements.append((statement.split("(")[0].strip(), many))

    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        engine = uow.session.sync_session.get_bind()
        event.listen(engine, "before_cursor_execute", seen)
        try:
            for i in range(20):
                await on_user_created(user_created(f"usr_{i:010d}"), cast(Any, uow))
            await uow.session.flush()
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        assert len((await uow.session.exec(select(Workspace))).all()) == 20
    inserts = [s for s in statements if s[0] == "INSERT INTO workspaces"]
    assert inserts == [("INSERT INTO workspaces", True)]  # one executemany, not 20 statements
    # each event's checks read without flushing the events before it
    assert sum(s[0].startswith("SELECT EXISTS") for s in statements) == 20
