"""tributary_erased_users: the ids of erased users, so late events cannot bring them back

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tributary_erased_users",
        sa.Column("user_id", sa.String(60), primary_key=True),
        sa.Column("erased_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tributary_erased_users")
