"""``eventctl outbox parked`` and ``eventctl outbox resend``: rows the producer's relay gave up on.

The relay parks a row after its bounded attempts (the broker kept returning it: no queue bound
to its routing key; or kept refusing it). A parked row blocks nothing and is never tried again
by the relay. ``parked`` lists such rows from the producer's database; ``resend`` publishes
them to the event exchange exactly as the relay would (same properties, the trace context of
the request that wrote them) and marks each one published after the broker's confirm. A row
that fails again stays parked with the new error. Fix the cause (bind the missing consumer)
first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any

import aio_pika
from aiormq.exceptions import AMQPError
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select

from tributary.eventctl.arguments import positive
from tributary.eventctl.broker import broker_options, redact
from tributary.eventctl.replay import DatabaseMissing, _app_id, database_engine
from tributary.messaging.db import OutboxRow, session_factory, utcnow
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.partitions import wire_routing_key
from tributary.messaging.publisher import Publisher, PublishRefused
from tributary.messaging.relay import outbox_message
from tributary.messaging.topology import Names

EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR = 0, 1, 2
AsyncHandler = Callable[[argparse.Namespace], Awaitable[int]]


@dataclass
class ResendCounts:
    selected: int = 0
    resent: int = 0
    failed: int = 0
    not_parked: int = 0
    """Event ids asked for that are not parked (unknown, published or still being retried)."""


def _parked() -> Any:
    return (col(OutboxRow.published_at).is_(None), col(OutboxRow.parked_at).is_not(None))


async def parked_rows(engine: AsyncEngine, *, limit: int | None = None) -> list[OutboxRow]:
    """Parked rows in commit order."""
    query = select(OutboxRow).where(*_parked()).order_by(col(OutboxRow.seq))
    if limit is not None:
        query = query.limit(limit)
    async with session_factory(engine)() as session:
        return list((await session.exec(query)).all())


def _trace_headers(row: OutboxRow) -> dict[str, Any]:
    try:
        carrier = json.loads(row.trace_headers or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in carrier.items() if isinstance(v, str)}


async def resend(
    engine: AsyncEngine,
    publisher: Publisher,
    exchange: str,
    event_ids: Sequence[str] | None,
    *,
    batch: int,
) -> ResendCounts:
    """Publish parked rows (all of them, or those of ``event_ids``) and mark them published.

    Stops after a batch in which the broker itself failed (not just a returned row): the rest
    stay parked, and running the command again goes on.
    """
    counts = ResendCounts()
    sessions = session_factory(engine)
    after = 0
    if event_ids is not None:
        async with sessions() as session:
            asked = select(OutboxRow.event_id).where(
                col(OutboxRow.event_id).in_(event_ids), *_parked()
            )
            found = set((await session.exec(asked)).all())
        counts.not_parked = len(set(event_ids) - found)
        for event_id in sorted(set(event_ids) - found):
            print(f"eventctl: {event_id} is not a parked outbox row; skipped", file=sys.stderr)
    while True:
        query = select(OutboxRow).where(*_parked(), col(OutboxRow.seq) > after)
        if event_ids is not None:
            query = query.where(col(OutboxRow.event_id).in_(event_ids))
        async with sessions() as session:
            rows = (await session.exec(query.order_by(col(OutboxRow.seq)).limit(batch))).all()
        if not rows:
            return counts
        counts.selected += len(rows)
        results = await asyncio.gather(
            *(
                publisher.publish(
                    exchange,
                    wire_routing_key(row.routing_key, row.body),  # a partitioned type: its slot
                    outbox_message(row, app_id=_app_id(row.body), headers=_trace_headers(row)),
                )
                for row in rows
            ),
            return_exceptions=True,
        )
        await _record(engine, rows, results, counts)
        if any(
            isinstance(r, InfrastructureError) and not isinstance(r, PublishRefused)
            for r in results
        ):
            return counts
        after = rows[-1].seq or after


async def _record(
    engine: AsyncEngine,
    rows: Sequence[OutboxRow],
    results: list[BaseException | None],
    counts: ResendCounts,
) -> None:
    now = utcnow()
    async with session_factory(engine)() as session, session.begin():
        for row, result in zip(rows, results, strict=True):
            still_parked = (col(OutboxRow.seq) == row.seq, *_parked())
            if result is None:
                counts.resent += 1
                await session.exec(
                    update(OutboxRow)
                    .where(*still_parked)
                    .values(published_at=now, parked_at=None, next_attempt_at=None)
                )
                continue
            counts.failed += 1
            error = f"{type(result).__name__}: {result}"[:500]
            print(f"eventctl: {row.event_id} not resent ({error}); still parked", file=sys.stderr)
            await session.exec(
                update(OutboxRow)
                .where(*still_parked)
                .values(attempts=OutboxRow.attempts + 1, last_error=error)
            )


# -- output -------------------------------------------------------------------------------

_COLUMNS = (
    "SEQ",
    "EVENT ID",
    "TYPE",
    "CREATED",
    "DELIVER AT",
    "PARKED",
    "ATTEMPTS",
    "LAST ERROR",
)


def _fields(row: OutboxRow) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "event_id": row.event_id,
        "type": row.routing_key,
        "created_at": row.created_at.isoformat() + "Z",
        # a scheduled row: not to be published before then (it was due when it was parked)
        "deliver_at": row.deliver_at.isoformat() + "Z" if row.deliver_at else None,
        "parked_at": row.parked_at.isoformat() + "Z" if row.parked_at else None,
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


def table(rows: Sequence[OutboxRow]) -> list[str]:
    """Aligned columns, the error last and never cut."""
    lines = [list(_COLUMNS)]
    lines += [["-" if v is None else str(v) for v in _fields(row).values()] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]])
        for line in lines
    ]


# -- commands -----------------------------------------------------------------------------


def _guarded(handler: AsyncHandler) -> AsyncHandler:
    """Expected failures (database, broker) end with a message and exit 2."""

    @wraps(handler)
    async def run(args: argparse.Namespace) -> int:
        try:
            return await handler(args)
        except DatabaseMissing as exc:
            print(f"eventctl: {exc}", file=sys.stderr)
        except SQLAlchemyError as exc:
            print(f"eventctl: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        except (AMQPError, InfrastructureError) as exc:
            given = getattr(args, "url", None), getattr(args, "prefix", None)
            url = redact(broker_options(*given).url)
            print(f"eventctl: broker {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        except OSError as exc:
            print(f"eventctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR

    return run


@_guarded
async def _parked_command(args: argparse.Namespace) -> int:
    engine = database_engine(args.database)
    try:
        rows = await parked_rows(engine, limit=args.limit)
    finally:
        await engine.dispose()
    summary = f"outbox parked: {len(rows)} row(s)"
    if args.json:
        for row in rows:
            print(json.dumps(_fields(row), ensure_ascii=False))
        print(summary, file=sys.stderr)  # stdout stays pure JSON lines
    else:
        if rows:
            print("\n".join(table(rows)))
        print(summary)
    return EXIT_OK


@_guarded
async def _resend_command(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    exchange = Names(options.prefix).exchange
    engine = database_engine(args.database)
    try:
        connection = await aio_pika.connect(
            options.url, client_properties={"connection_name": "eventctl"}
        )
        try:
            publisher = Publisher(connection, in_flight=args.batch, timeout=args.timeout)
            await publisher.open()
            ids = None if args.all else list(args.event_ids)
            counts = await resend(engine, publisher, exchange, ids, batch=args.batch)
        finally:
            await connection.close()
    finally:
        await engine.dispose()
    print(
        f"outbox resend -> {exchange}: selected {counts.selected}, resent {counts.resent}, "
        f"failed {counts.failed} (still parked), not parked {counts.not_parked}"
    )
    return EXIT_INCOMPLETE if counts.failed or counts.not_parked else EXIT_OK


def _seconds(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return number


def add_outbox_commands(groups: Any) -> None:
    outbox = groups.add_parser("outbox", help="parked outbox rows: list and resend")
    cmds = outbox.add_subparsers(dest="command", metavar="COMMAND", required=True)
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database",
        required=True,
        metavar="URL",
        help="the producer's database (postgresql+asyncpg://… or sqlite+aiosqlite:///…)",
    )

    listing = cmds.add_parser(
        "parked",
        parents=[database],
        help="list the outbox rows the relay parked",
        description="List the producer's parked outbox rows, oldest first: events the broker "
        "kept returning (no queue bound to the routing key) or refusing, after the relay's "
        "bounded attempts. They are not retried until 'eventctl outbox resend'. Read only.",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=positive, metavar="N", help="show at most N rows")
    listing.set_defaults(handler=_parked_command)

    resend_parser = cmds.add_parser(
        "resend",
        parents=[database],
        help="publish parked outbox rows again",
        description="Publish parked rows to the event exchange (<prefix>tributary.events) as "
        "the relay would, and mark each one published once the broker confirms it. A row the "
        "broker returns or refuses again stays parked with the new error (exit 1). Bind the "
        "missing consumer first. Consumers deduplicate, so resending is safe to repeat.",
    )
    which = resend_parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every parked row")
    which.add_argument("event_ids", nargs="*", default=[], metavar="EVENT_ID", help="event ids")
    resend_parser.add_argument(
        "--url",
        metavar="AMQP_URL",
        help="broker (default: $RABBITMQ_URL or amqp://guest:guest@127.0.0.1:5672/)",
    )
    resend_parser.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="prefix of every exchange and queue name (default: $TRIBUTARY_NAME_PREFIX or none)",
    )
    resend_parser.add_argument(
        "--batch",
        type=positive,
        default=100,
        metavar="N",
        help="rows read and confirms in flight at a time (default 100)",
    )
    resend_parser.add_argument(
        "--timeout",
        type=_seconds,
        default=15.0,
        metavar="S",
        help="longest wait for each confirm, in seconds (default 15)",
    )
    resend_parser.set_defaults(handler=_resend_command)
