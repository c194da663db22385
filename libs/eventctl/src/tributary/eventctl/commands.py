"""The ``dlq`` and ``replay`` command groups: arguments, and the handlers that run them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import AMQPError
from sqlalchemy.exc import SQLAlchemyError

from tributary.contracts.catalog import CatalogError
from tributary.eventctl import dlq, report
from tributary.eventctl.arguments import positive
from tributary.eventctl.broker import (
    BrokerOptions,
    QueueMissing,
    broker_options,
    queues_for,
    redact,
)
from tributary.eventctl.entries import Selector, parse_instant
from tributary.eventctl.progress import EXIT_INTERRUPTED, Interrupt, Pace, RateLimiter, bar
from tributary.eventctl.replay import (
    DatabaseMissing,
    OutboxSelection,
    database_engine,
    parse_time,
    replay_outbox,
)
from tributary.messaging.errors import Unroutable

EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR = 0, 1, 2
AsyncHandler = Callable[[argparse.Namespace], Awaitable[int]]


def _guarded(handler: AsyncHandler) -> AsyncHandler:
    """Expected failures (broker, database, names) end with a message and exit 2."""

    @wraps(handler)
    async def run(args: argparse.Namespace) -> int:
        try:
            return await handler(args)
        except (QueueMissing, DatabaseMissing, CatalogError, Unroutable) as exc:
            print(f"eventctl: {exc}", file=sys.stderr)
        except AMQPError as exc:
            url = redact(broker_options(args.url, args.prefix).url)
            print(f"eventctl: broker {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        except SQLAlchemyError as exc:
            print(f"eventctl: database: {type(exc).__name__}: {exc}", file=sys.stderr)
        except OSError as exc:  # the archive file, or a socket error outside the AMQP client
            print(f"eventctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR

    return run


@asynccontextmanager
async def _connected(options: BrokerOptions) -> AsyncIterator[AbstractConnection]:
    # not a robust connection: a held read must not silently move to a new channel
    connection = await aio_pika.connect(
        options.url, client_properties={"connection_name": "eventctl"}
    )
    try:
        yield connection
    finally:
        await connection.close()


def _scope(args: argparse.Namespace) -> dlq.Scope:
    selector = Selector.of(
        args.reason,
        args.type,
        args.id,
        since=args.since,
        until=args.until,
        correlation_ids=args.correlation_id,
    )
    return dlq.Scope(selector, args.limit)


def _exit(counts: report.Counts) -> int:
    if counts.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_INCOMPLETE if counts.failed or counts.unacked else EXIT_OK


@contextmanager
def _paced(args: argparse.Namespace, description: str) -> Iterator[Pace]:
    """The job's progress bar, ``--rate`` and Ctrl-C flag, for the duration of the block."""
    with (
        Interrupt.on_sigint() as stop,
        bar(description, no_progress=args.no_progress) as shown,
    ):
        yield Pace(shown, RateLimiter(args.rate), stop)


@_guarded
async def _dlq_list(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    queues = queues_for(args.name, options.prefix)
    async with _connected(options) as connection:
        entries, counts = await dlq.list_entries(connection, queues.dlq, _scope(args))
    summary = report.dlq_summary("list", queues.dlq, None, counts)
    if args.json:
        for line in report.json_lines(queues.dlq, entries):
            print(line)
        print(summary, file=sys.stderr)  # stdout stays pure JSON lines
    else:
        if entries:
            print("\n".join(report.table(entries)))
        print(summary)
    return EXIT_OK


@_guarded
async def _dlq_replay(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    queues = queues_for(args.name, options.prefix)
    async with _connected(options) as connection:
        with _paced(args, f"replay {queues.dlq}") as pace:
            counts = await dlq.replay(
                connection,
                queues,
                _scope(args),
                batch=args.batch,
                dry_run=args.dry_run,
                pace=pace,
            )
    print(report.dlq_summary("replay", queues.dlq, queues.work, counts, dry_run=args.dry_run))
    return _exit(counts)


@_guarded
async def _dlq_archive(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    queues = queues_for(args.name, options.prefix)
    async with _connected(options) as connection:
        with _paced(args, f"archive {queues.dlq}") as pace:
            counts = await dlq.archive(
                connection,
                queues.dlq,
                _scope(args),
                args.to,
                batch=args.batch,
                dry_run=args.dry_run,
                pace=pace,
            )
    summary = report.dlq_summary("archive", queues.dlq, str(args.to), counts, dry_run=args.dry_run)
    print(summary)
    return _exit(counts)


@_guarded
async def _replay_outbox(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    target = queues_for(args.to_service, options.prefix).work
    selection = OutboxSelection(tuple(args.type), args.since, args.until)
    engine = database_engine(args.database)
    try:
        async with _connected(options) as connection:
            with _paced(args, f"replay -> {target}") as pace:
                counts = await replay_outbox(
                    engine,
                    connection,
                    target,
                    selection,
                    force=args.force,
                    batch=args.batch,
                    dry_run=args.dry_run,
                    pace=pace,
                )
    finally:
        await engine.dispose()
    print(report.outbox_summary(selection.types, target, counts, dry_run=args.dry_run))
    return _exit(counts)


# -- arguments ------------------------------------------------------------------------------


def _iso_time(value: str) -> Any:
    try:
        return parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None


def dlq_time(value: str) -> Any:
    """``--since``/``--until`` of the dlq commands: ISO 8601, aware UTC (no offset: UTC)."""
    moment = parse_instant(value)
    if moment is None:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time (2026-01-09, 2026-01-09T12:00:00Z): {value[:80]!r}"
        )
    return moment


def _rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value[:80]!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value[:80]}")
    return number


def _broker_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        metavar="AMQP_URL",
        help="broker (default: $RABBITMQ_URL or amqp://guest:guest@127.0.0.1:5672/)",
    )
    common.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="prefix of every exchange and queue name (default: $TRIBUTARY_NAME_PREFIX or none)",
    )
    return common


def _filter_arguments() -> argparse.ArgumentParser:
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters (all given must match; repeat to allow several)")
    group.add_argument(
        "--reason",
        action="append",
        metavar="R",
        help="DLQ reason: handler_error, retries_exhausted, schema_invalid, malformed, "
        "unknown_type, upcast_failed, unauthorized_producer, idempotency_conflict, "
        "unexpected_error, delivery_limit",
    )
    group.add_argument(
        "--type",
        action="append",
        metavar="T",
        help="event type: user.created (any version), user.created.v1 or its CloudEvents type",
    )
    group.add_argument("--id", nargs="+", action="extend", metavar="ID", help="message (event) ids")
    group.add_argument(
        "--correlation-id",
        nargs="+",
        action="extend",
        metavar="ID",
        help="correlation ids (one request's messages)",
    )
    group.add_argument(
        "--since",
        type=dlq_time,
        metavar="ISO",
        help="dead-lettered at or after this ISO 8601 time (no offset: UTC); by the "
        "runtime's x-tributary-last-failure header, else the broker's x-death time",
    )
    group.add_argument(
        "--until", type=dlq_time, metavar="ISO", help="dead-lettered before this time"
    )
    group.add_argument("--limit", type=positive, metavar="N", help="act on at most N messages")
    return filters


INTERRUPT_NOTE = (
    " A progress bar (count, rate, ETA) is drawn on stderr when it is a terminal. Ctrl-C "
    "stops cleanly: the publishes (or archive writes) under way finish, nothing new starts, "
    "the counts so far are printed and the exit code is 130; run it again for the rest."
)


def _change_arguments(parser: argparse.ArgumentParser, *, batch_help: str) -> None:
    if parser.description:
        parser.description += INTERRUPT_NOTE
    parser.add_argument("--batch", type=positive, default=100, metavar="N", help=batch_help)
    parser.add_argument(
        "--dry-run", action="store_true", help="only count what would be done; change nothing"
    )
    parser.add_argument(
        "--rate",
        type=_rate,
        metavar="N",
        help="at most N messages per second (default: as fast as the confirms come)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )


def add_dlq_commands(groups: Any) -> None:
    broker, filters = _broker_arguments(), _filter_arguments()
    dlq_parser = groups.add_parser("dlq", help="inspect, replay and archive dead-letter queues")
    cmds = dlq_parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    name_help = "a service (DLQ <prefix><service>.dlq) or a command queue (email.send)"

    listing = cmds.add_parser(
        "list",
        parents=[broker, filters],
        help="show DLQ messages without removing them",
        description="Show the messages of a DLQ and why they failed. Nothing is removed: the "
        "messages are read unacknowledged and handed back when the listing ends.",
    )
    listing.add_argument("name", help=name_help)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_dlq_list)

    replay = cmds.add_parser(
        "replay",
        parents=[broker, filters],
        help="republish DLQ messages to their work queue",
        description="Republish the selected DLQ messages to the work queue they failed in "
        "(<prefix><service>.events, or the command queue), through the default exchange so "
        "no other consumer gets a copy. Body and properties are unchanged; the failure "
        "headers are removed, so attempts and retries start afresh. Each DLQ copy is removed "
        "only after the broker confirms its replacement; the rest stay in the DLQ. Fix the "
        "cause first: a message that fails again comes back to the DLQ.",
    )
    replay.add_argument("name", help=name_help)
    _change_arguments(replay, batch_help="publisher confirms in flight (default 100)")
    replay.set_defaults(handler=_dlq_replay)

    archive = cmds.add_parser(
        "archive",
        parents=[broker, filters],
        help="move DLQ messages into a JSON-lines file",
        description="Append the selected DLQ messages to FILE (one JSON object per line: "
        "what 'dlq list' shows, properties, headers, body in base64) and remove them from "
        "the DLQ only after the file is fsynced. An existing file is appended to.",
    )
    archive.add_argument("name", help=name_help)
    archive.add_argument("--to", type=Path, required=True, metavar="FILE", help="archive file")
    _change_arguments(archive, batch_help="messages per fsync (default 100)")
    archive.set_defaults(handler=_dlq_archive)


def add_replay_commands(groups: Any) -> None:
    replay = groups.add_parser("replay", help="replay published events to one consumer")
    cmds = replay.add_subparsers(dest="command", metavar="COMMAND", required=True)
    outbox = cmds.add_parser(
        "outbox",
        parents=[_broker_arguments()],
        help="replay a producer's published outbox events to one service's queue",
        description="Read events the producer has published (its tributary_outbox table "
        "keeps them for the replay window) and publish them again to ONE consumer's work "
        "queue, through the default exchange: no other service receives them. Each copy "
        "carries x-tributary-replay: 1, so the consumer's handlers see uow.is_replay and "
        "suppress irreversible side effects (mail, payments); --force adds "
        "x-tributary-replay-forced: 1 for handlers that let an operator ask for them. The "
        "consumer's "
        "inbox still deduplicates: events it has already processed are acknowledged as "
        "duplicates and their handlers do not run again, so a replay only fills gaps "
        "(a new consumer, a restored database). Rows not yet published are skipped; the "
        "producer's relay delivers them.",
    )
    outbox.add_argument(
        "--database",
        required=True,
        metavar="URL",
        help="the producer's database (postgresql+asyncpg://… or sqlite+aiosqlite:///…)",
    )
    outbox.add_argument(
        "--type",
        action="append",
        required=True,
        metavar="T",
        help="event type: user.created (every version) or user.created.v1; repeatable",
    )
    outbox.add_argument(
        "--from", dest="since", type=_iso_time, metavar="ISO", help="created at or after"
    )
    outbox.add_argument("--to", dest="until", type=_iso_time, metavar="ISO", help="created before")
    outbox.add_argument(
        "--to-service",
        required=True,
        metavar="SERVICE",
        help="the one consumer to replay to (its queue <prefix><service>.events)",
    )
    outbox.add_argument(
        "--force",
        action="store_true",
        help="also mark the copies x-tributary-replay-forced: 1 (side effects wanted)",
    )
    _change_arguments(outbox, batch_help="rows read and confirms in flight at a time (default 100)")
    outbox.set_defaults(handler=_replay_outbox)
