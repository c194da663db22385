"""addresses, preferences, the in-app inbox, deliveries, and the messaging runtime's tables

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tributary.service.migrations import (
    create_erased_users,
    create_runtime_tables,
    drop_erased_users,
    drop_runtime_tables,
    park_outbox_rows,
    unpark_outbox_rows,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    create_runtime_tables()
    park_outbox_rows()
    create_erased_users()
    op.create_table(
        "addresses",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("locale", sa.String(10), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("email_changed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "preferences",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("category", sa.String(20), primary_key=True),
        sa.Column("channel", sa.String(20), primary_key=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "inbox_heads",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("last_seq", SEQ, nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("category", sa.String(20), nullable=False),
        sa.Column("urgent", sa.Boolean(), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.String(1000), nullable=False),
        sa.Column("url", sa.String(2048), nullable=True),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("user_id", "source", name="uq_notifications_source"),
    )
    op.create_table(
        "deliveries",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("channel", sa.String(20), primary_key=True),
        sa.Column("category", sa.String(20), nullable=False),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("reference", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("notifications")
    op.drop_table("inbox_heads")
    op.drop_table("preferences")
    op.drop_table("addresses")
    drop_erased_users()
    unpark_outbox_rows()
    drop_runtime_tables()
