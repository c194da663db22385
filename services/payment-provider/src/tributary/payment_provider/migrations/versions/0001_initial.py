"""checkouts, payments, refunds and webhook messages

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "provider_checkouts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reference", sa.String(100), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=True),
        sa.Column("decline_reason", sa.String(200), nullable=True),
        _ts("settle_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_index("ix_provider_checkouts_reference", "provider_checkouts", ["reference"])
    op.create_index("ix_provider_checkouts_settle_at", "provider_checkouts", ["settle_at"])
    op.create_table(
        "provider_payments",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("checkout_id", sa.String(40), nullable=False, unique=True),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "provider_refunds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("payment_id", sa.String(40), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        _ts("created_at"),
    )
    op.create_index("ix_provider_refunds_payment_id", "provider_refunds", ["payment_id"])
    op.create_table(
        "provider_webhook_messages",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("next_attempt_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("delivered_at", nullable=True),
        _ts("failed_at", nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
    )
    op.create_index(
        "ix_provider_webhook_messages_next_attempt_at",
        "provider_webhook_messages",
        ["next_attempt_at"],
    )


def downgrade() -> None:
    op.drop_table("provider_webhook_messages")
    op.drop_table("provider_refunds")
    op.drop_table("provider_payments")
    op.drop_table("provider_checkouts")
