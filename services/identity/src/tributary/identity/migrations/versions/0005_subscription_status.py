"""subscriptions: status (active / cancelled) and cancelled_at; activated_at empty for a
payment billing cancelled before identity activated it (a tombstone: it activates nothing)

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:  # SQLite alters by copying
        batch.add_column(
            sa.Column("status", sa.String(20), nullable=False, server_default="active")
        )
        batch.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("activated_at", existing_type=sa.DateTime(timezone=True), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM subscriptions WHERE activated_at IS NULL")
    with op.batch_alter_table("subscriptions") as batch:
        batch.alter_column("activated_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.drop_column("cancelled_at")
        batch.drop_column("status")
