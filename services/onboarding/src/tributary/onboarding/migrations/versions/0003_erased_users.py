"""tributary_erased_users: the ids of erased users, so late events cannot bring them back

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

from tributary.service.migrations import create_erased_users, drop_erased_users

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    create_erased_users()


def downgrade() -> None:
    drop_erased_users()
