"""the sagas projection (proj_sagas): a subscription saga's state, reason and pending timeout

Revision ID: 0002
Revises: 0001

Its ``projection_state`` row starts at position 0: the service catches the projection up from
the whole event store at start-up, before it appends or serves anything.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "proj_sagas",
        sa.Column("subscription_id", sa.String(60), primary_key=True),
        sa.Column("state", sa.String(30), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("pending_timeout_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_proj_sagas_state", "proj_sagas", ["state", "updated_at"])
    op.bulk_insert(
        sa.table(
            "projection_state",
            sa.column("name", sa.String),
            sa.column("table_name", sa.String),
            sa.column("position", POSITION),
            sa.column("updated_at", sa.DateTime(timezone=True)),
        ),
        [
            {
                "name": "sagas",
                "table_name": "proj_sagas",
                "position": 0,
                "updated_at": datetime.now(UTC),
            }
        ],
    )


def downgrade() -> None:
    # a rebuild may have swapped in another table: drop the one the projection serves from
    table_name = op.get_bind().scalar(
        sa.text("SELECT table_name FROM projection_state WHERE name = 'sagas'")
    )
    op.execute("DELETE FROM projection_state WHERE name = 'sagas'")
    for name in {"proj_sagas", table_name or "proj_sagas"}:
        op.execute(f'DROP TABLE IF EXISTS "{name}"')
