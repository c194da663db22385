"""the event store (append-only), data keys, stream index, webhook receipts, projections and
the messaging runtime's tables

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from tributary.service.migrations import (
    create_erased_users,
    create_runtime_tables,
    drop_erased_users,
    drop_runtime_tables,
    park_outbox_rows,
    schedule_outbox_rows,
    unpark_outbox_rows,
    unschedule_outbox_rows,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_PG_REJECT = """
CREATE FUNCTION event_store_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_store is append-only: % rejected', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_PG_TRIGGER = """
CREATE TRIGGER event_store_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON event_store
    FOR EACH STATEMENT EXECUTE FUNCTION event_store_reject_change()
"""
_SQLITE_TRIGGER = """
CREATE TRIGGER event_store_no_{op} BEFORE {OP} ON event_store
BEGIN
    SELECT RAISE(ABORT, 'event_store is append-only: {OP} rejected');
END
"""


def upgrade() -> None:
    create_runtime_tables()
    park_outbox_rows()
    schedule_outbox_rows()
    create_erased_users()
    op.create_table(
        "event_store",
        sa.Column("position", POSITION, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("stream_id", sa.String(60), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(60), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("stream_id", "version", name="uq_event_store_stream_version"),
        sqlite_autoincrement=True,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_REJECT)
        op.execute(_PG_TRIGGER)
    else:
        for name in ("update", "delete"):
            op.execute(_SQLITE_TRIGGER.format(op=name, OP=name.upper()))
    op.create_table(
        "data_keys",
        sa.Column("key_id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(60), nullable=False, unique=True),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "stream_index",
        sa.Column("kind", sa.String(20), primary_key=True),
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("stream_id", sa.String(60), nullable=False),
    )
    op.create_table(
        "webhook_receipts",
        sa.Column("webhook_id", sa.String(200), primary_key=True),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("stream_id", sa.String(60), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "projection_state",
        sa.Column("name", sa.String(60), primary_key=True),
        sa.Column("table_name", sa.String(60), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "proj_subscriptions",
        sa.Column("subscription_id", sa.String(60), primary_key=True),
        sa.Column("user_id", sa.String(60), nullable=True),
        sa.Column("plan", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("checkout_id", sa.String(40), nullable=True),
        sa.Column("payment_id", sa.String(60), nullable=True),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_proj_subscriptions_user_status",
        "proj_subscriptions",
        ["user_id", "status", "created_at"],
    )
    op.create_index("ix_proj_subscriptions_status", "proj_subscriptions", ["status", "created_at"])
    op.create_table(
        "proj_revenue",
        sa.Column("plan", sa.String(20), primary_key=True),
        sa.Column("currency", sa.String(3), primary_key=True),
        sa.Column("payments", sa.BigInteger(), nullable=False),
        sa.Column("gross_cents", sa.BigInteger(), nullable=False),
        sa.Column("refunds", sa.BigInteger(), nullable=False),
        sa.Column("refunded_cents", sa.BigInteger(), nullable=False),
    )
    stamp = datetime.now(UTC)
    op.bulk_insert(
        sa.table(
            "projection_state",
            sa.column("name", sa.String),
            sa.column("table_name", sa.String),
            sa.column("position", POSITION),
            sa.column("updated_at", sa.DateTime(timezone=True)),
        ),
        [
            {"name": name, "table_name": f"proj_{name}", "position": 0, "updated_at": stamp}
            for name in ("subscriptions", "revenue")
        ],
    )


def downgrade() -> None:
    # a rebuild may have swapped in other tables (proj_<name>_<n>): drop what projection_state
    # names too
    bind = op.get_bind()
    served = bind.execute(sa.text("SELECT table_name FROM projection_state")).scalars().all()
    for name in {"proj_revenue", "proj_subscriptions", *served}:
        op.execute(f'DROP TABLE IF EXISTS "{name}"')
    op.drop_table("projection_state")
    op.drop_table("webhook_receipts")
    op.drop_table("stream_index")
    op.drop_table("data_keys")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER event_store_append_only ON event_store")
        op.execute("DROP FUNCTION event_store_reject_change()")
    op.drop_table("event_store")
    drop_erased_users()
    unschedule_outbox_rows()
    unpark_outbox_rows()
    drop_runtime_tables()
