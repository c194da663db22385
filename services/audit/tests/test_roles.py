"""On PostgreSQL the service runs as a role that can only append to the log; migrations run
as the tables' owner."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError

from tributary.messaging.db import create_engine
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database

from .test_api import audit_service, new_user_id
from .test_handlers import user_created


@dataclass
class Roles:
    owner_url: str
    app_url: str
    app_role: str


async def run_sql(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def roles(postgres: Found) -> AsyncIterator[Roles]:
    """A fresh database owned by a new owner role, and a new login role for the service."""
    suffix = uuid.uuid4().hex[:10]
    owner, app, name = f"t_owner_{suffix}", f"t_app_{suffix}", f"t_audit_roles_{suffix}"
    await run_sql(
        postgres.url,
        f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER',
        f'CREATE ROLE "{app}" LOGIN NOSUPERUSER',
    )
    url = await create_postgres_database(postgres.url, name)
    try:
        await run_sql(postgres.url, f'ALTER DATABASE "{name}" OWNER TO "{owner}"')
        await run_sql(url, f'ALTER SCHEMA public OWNER TO "{owner}"')
        base = make_url(url)
        yield Roles(
            owner_url=base.set(username=owner).render_as_string(hide_password=False),
            app_url=base.set(username=app).render_as_string(hide_password=False),
            app_role=app,
        )
    finally:
        await drop_postgres_database(postgres.url, name)
        await run_sql(
            postgres.url, f'DROP ROLE IF EXISTS "{app}"', f'DROP ROLE IF EXISTS "{owner}"'
        )


async def test_the_service_role_may_only_insert_and_select_on_the_log(
    roles: Roles, rabbitmq: Found
) -> None:
    async with audit_service(
        roles.app_url,
        rabbitmq,
        AUDIT_MIGRATION_DATABASE_URL=roles.owner_url,
        AUDIT_APP_ROLE=roles.app_role,
        AUDIT_CHECKPOINT_EVERY=2,
    ) as audit:
        await audit.record(*(user_created(new_user_id()) for _ in range(2)))
        assert len(await audit.entries()) == 2
        result = await audit.verify()
        assert result["ok"] is True
        assert result["checkpoint"]["seq"] == 2  # the checkpoint's outbox row went out

        for statement in (
            "UPDATE audit_entries SET subject = 'users/x' WHERE seq = 1",
            "DELETE FROM audit_entries WHERE seq = 2",
            "TRUNCATE audit_entries",
            "DELETE FROM audit_checkpoints",
            "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
            "DROP TRIGGER audit_entries_append_only ON audit_entries",
        ):
            with pytest.raises(DBAPIError, match=r"permission denied|must be owner"):
                await run_sql(roles.app_url, statement)
        engine = create_engine(roles.app_url)
        try:
            async with engine.connect() as conn:
                count = (await conn.execute(text("SELECT count(*) FROM audit_entries"))).scalar()
                assert count == 2
                super_ = (
                    await conn.execute(
                        text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                    )
                ).scalar()
                assert super_ is False
        finally:
            await engine.dispose()
        # the owner (a superuser could too) can still get past the triggers: checkpoints tell
        await run_sql(
            roles.owner_url,
            "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
            "DELETE FROM audit_entries WHERE seq = 2",
        )
        cut = await audit.verify()
        assert (cut["ok"], cut["broken_at"]) == (False, 2)
