"""emails.claimed_at, emails.claimed_by: the claim committed before the SMTP conversation

Revision ID: 0006
Revises: 0005

Existing rows are settled (``sent``, ``failed``, ``suppressed``): they get no claim.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("emails", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("emails", sa.Column("claimed_by", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch:  # SQLite drops columns by copying
        batch.drop_column("claimed_by")
        batch.drop_column("claimed_at")
