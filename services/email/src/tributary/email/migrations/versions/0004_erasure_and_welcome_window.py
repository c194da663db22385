"""welcome_sends (keyed address hashes and their last welcome) and tributary_erased_users

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tributary.service.migrations import create_erased_users, drop_erased_users

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "welcome_sends",
        sa.Column("address_hash", sa.String(64), primary_key=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=False),
    )
    create_erased_users()


def downgrade() -> None:
    drop_erased_users()
    op.drop_table("welcome_sends")
