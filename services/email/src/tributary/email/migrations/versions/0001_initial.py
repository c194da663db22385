"""emails, recipients and the messaging runtime's tables

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
        "emails",
        sa.Column("id", sa.String(60), primary_key=True),
        sa.Column("logical_key", sa.String(200), nullable=False),
        sa.Column("message_id", sa.String(250), nullable=False),
        sa.Column("to", sa.String(254), nullable=False),
        sa.Column("template", sa.String(40), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("user_id", sa.String(60), nullable=True),
        sa.Column("correlation_id", sa.String(200), nullable=True),
        sa.Column("error", sa.String(500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_emails_logical_key", "emails", ["logical_key"], unique=True)
    op.create_index("ix_emails_to", "emails", ["to"])
    op.create_index("ix_emails_user_id", "emails", ["user_id"])
    op.create_table(
        "recipients",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("given_name", sa.String(200), nullable=False),
        sa.Column("locale", sa.String(10), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("recipients")
    op.drop_table("emails")
    drop_runtime_tables()
