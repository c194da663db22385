"""signing keys of access tokens (Ed25519), one generation active at a time

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("generation", sa.Integer(), nullable=False, unique=True),
        sa.Column("private_key_pem", sa.Text(), nullable=True),
        sa.Column("public_jwk", sa.Text(), nullable=False),
        _timestamp("created_at"),
        _timestamp("activated_at"),
        _timestamp("retired_at", nullable=True),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
