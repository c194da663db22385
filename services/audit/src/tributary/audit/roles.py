"""PostgreSQL privileges: the service runs as a role that can only append to the log.

The tables belong to the role migrations run as (``AUDIT_MIGRATION_DATABASE_URL``). The
service's own role (``AUDIT_APP_ROLE``, the user of ``AUDIT_DATABASE_URL``) gets INSERT and
SELECT on the log tables -- no UPDATE, DELETE or TRUNCATE, and not being the owner it cannot
drop or disable the append-only triggers -- and what the messaging runtime needs on its own
tables (outbox, inbox, leases: SELECT, INSERT, UPDATE, DELETE) and their sequences. Granting
is idempotent and runs as the owner at every start-up, after the migrations, so tables a later
migration adds are covered. Operators can run :func:`grant_app_role` by hand as well.
"""

from __future__ import annotations

import re

from sqlalchemy import text

from tributary.messaging.db import create_engine

LOG_TABLES = ("audit_entries", "audit_checkpoints")
OWNER_ONLY = ("alembic_version",)
_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def grant_app_role(owner_url: str, role: str) -> None:
    """As the owner: give ``role`` append-only access to the log, full access to the rest."""
    if not _ROLE.fullmatch(role):
        raise ValueError("a role name is lower-case letters, digits and underscores")
    quoted = f'"{role}"'
    engine = create_engine(owner_url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name != "postgresql":
                return
            tables = (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                )
            ).scalars()
            await conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {quoted}"))
            for table in sorted(tables):
                if table in OWNER_ONLY:
                    continue
                privileges = (
                    "SELECT, INSERT" if table in LOG_TABLES else "SELECT, INSERT, UPDATE, DELETE"
                )
                await conn.execute(text(f'GRANT {privileges} ON "{table}" TO {quoted}'))
            await conn.execute(
                text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}")
            )
    finally:
        await engine.dispose()
