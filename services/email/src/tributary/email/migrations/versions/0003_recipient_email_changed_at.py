"""recipients.email_changed_at: when the address a recipient row shows was changed

Revision ID: 0003
Revises: 0002

Existing rows get none, so the next address change applies to them whatever its time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "recipients", sa.Column("email_changed_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch:  # SQLite drops columns by copying
        batch.drop_column("email_changed_at")
