"""quiet hours (per user), deliveries held by them, mention digests and their items

Revision ID: 0004_quiet_hours_digest
Revises: 0003_webhooks
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_quiet_hours_digest"
down_revision: str | None = "0003_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("closed_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "quiet_hours",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("start", sa.String(8), nullable=False),
        sa.Column("end", sa.String(8), nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "held_deliveries",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("channel", sa.String(20), primary_key=True),
        sa.Column("category", sa.String(20), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.String(2000), nullable=False),
        sa.Column("url", sa.String(2048), nullable=True),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("release_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_held_deliveries_release", "held_deliveries", ["user_id", "release_at"])
    op.create_table(
        "digests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(60), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closes_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mentions", sa.Integer(), nullable=False),
    )
    op.create_index("ix_digests_user", "digests", ["user_id"])
    # at most one open digest per user
    op.create_index(
        "uq_digests_open",
        "digests",
        ["user_id"],
        unique=True,
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )
    op.create_table(
        "digest_items",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("source", sa.String(200), primary_key=True),
        sa.Column("digest_id", sa.String(40), nullable=False),
        sa.Column("url", sa.String(2048), nullable=True),
        sa.Column("event_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_digest_items_digest", "digest_items", ["digest_id"])


def downgrade() -> None:
    op.drop_index("ix_digest_items_digest", "digest_items")
    op.drop_table("digest_items")
    op.drop_index("uq_digests_open", "digests")
    op.drop_index("ix_digests_user", "digests")
    op.drop_table("digests")
    op.drop_index("ix_held_deliveries_release", "held_deliveries")
    op.drop_table("held_deliveries")
    op.drop_table("quiet_hours")
