"""messaging runtime: scheduled outbox rows (deliver_at), claim index reading them by due time

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from tributary.service.migrations import schedule_outbox_rows, unschedule_outbox_rows

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    schedule_outbox_rows()


def downgrade() -> None:
    unschedule_outbox_rows()
