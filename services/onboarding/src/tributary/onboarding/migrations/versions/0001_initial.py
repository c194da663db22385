"""workspaces and the messaging runtime's tables

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tributary.service.migrations import create_runtime_tables, drop_runtime_tables

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_runtime_tables()
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(60), primary_key=True),
        sa.Column("owner_id", sa.String(60), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_workspaces_owner_id", "workspaces", ["owner_id"], unique=True)


def downgrade() -> None:
    op.drop_table("workspaces")
    drop_runtime_tables()
