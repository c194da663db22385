"""The ``queue`` command group: ``queue show`` and ``queue migrate`` (see :mod:`.migrate`)."""

from __future__ import annotations

import argparse
import sys
from functools import wraps
from typing import Any

from tributary.eventctl.admin import AdminError, BrokerAdmin, broker_admin
from tributary.eventctl.arguments import positive
from tributary.eventctl.broker import broker_options, queues_for
from tributary.eventctl.commands import EXIT_ERROR, EXIT_OK, AsyncHandler, _connected, _guarded
from tributary.eventctl.migrate import MigrationBlocked, Target, migrate, retry_root
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import MIGRATING_SUFFIX, Names

SHOWN_ARGUMENTS = ("x-delivery-limit", "x-message-ttl")


def _handled(handler: AsyncHandler) -> AsyncHandler:
    """The ``dlq`` commands' error handling, plus the admin and migration refusals."""
    guarded = _guarded(handler)

    @wraps(handler)
    async def run(args: argparse.Namespace) -> int:
        try:
            return await guarded(args)
        except (AdminError, MigrationBlocked, InfrastructureError) as exc:
            print(f"eventctl: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _admin(args: argparse.Namespace, url: str) -> BrokerAdmin:
    return broker_admin(
        url, management_url=args.management_url, rabbitmqctl=args.rabbitmqctl, node=args.node
    )


@_handled
async def _show(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    qs = queues_for(args.name, options.prefix)
    queues = await _admin(args, options.url).queues()
    root = retry_root(qs)
    mine = sorted(
        name
        for name in queues
        if name in (qs.work, qs.dlq) or name.startswith((root, qs.work + MIGRATING_SUFFIX))
    )
    if not mine:
        print(f"eventctl: no queues of {qs.consumer!r} (check the name and --prefix)")
        return EXIT_ERROR
    print(f"{'queue':<48} {'messages':>8} {'consumers':>9}  arguments / policy")
    for name in mine:
        info = queues[name]
        shown = [f"{k}={info.arguments[k]}" for k in SHOWN_ARGUMENTS if k in info.arguments]
        if info.policy:
            shown.append(f"policy={info.policy}")
        print(f"{name:<48} {info.messages:>8} {info.consumers:>9}  {' '.join(shown)}")
    return EXIT_OK


@_handled
async def _migrate(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    settings = MessagingSettings()  # the service's own settings, from the same environment
    delivery_limit: int = args.delivery_limit or settings.delivery_limit
    tiers: tuple[float, ...] = (
        settings.retry_tiers if args.retry_tiers is None else args.retry_tiers
    )
    target = Target.of(
        Names(options.prefix),
        queues_for(args.name, options.prefix),
        delivery_limit=delivery_limit,
        tier_seconds=tiers,
    )
    print(
        f"{target.queues.consumer}: delivery limit {delivery_limit}, retry tiers "
        f"{', '.join(f'{t:g} s' for t in tiers) or 'none'}"
    )
    async with _connected(options) as connection:
        await migrate(
            connection, _admin(args, options.url), target, batch=args.batch, dry_run=args.dry_run
        )
    return EXIT_OK


def _tiers(value: str) -> tuple[float, ...]:
    try:
        tiers = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of seconds: {value!r}"
        ) from None
    if any(t <= 0 for t in tiers):
        raise argparse.ArgumentTypeError(f"every tier must be longer than 0 s: {value!r}")
    return tiers


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="a service (<prefix><service>.events) or a command queue")
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
    admin = common.add_argument_group(
        "broker management (queue arguments and bindings are not visible over AMQP)"
    )
    admin.add_argument(
        "--management-url",
        metavar="URL",
        help="management HTTP API, e.g. http://user:pass@host:15672 (credentials default to "
        "the AMQP URL's); without it rabbitmqctl on this host is used",
    )
    admin.add_argument(
        "--rabbitmqctl", default="rabbitmqctl", metavar="PATH", help="(default: rabbitmqctl)"
    )
    admin.add_argument("--node", metavar="NODE", help="rabbitmqctl -n NODE (default: its own)")
    return common


def add_queue_commands(groups: Any) -> None:
    common = _common()
    queue = groups.add_parser("queue", help="inspect a service's queues, migrate their arguments")
    cmds = queue.add_subparsers(dest="command", metavar="COMMAND", required=True)

    show = cmds.add_parser(
        "show",
        parents=[common],
        help="messages, consumers, delivery limit and retry delays of a service's queues",
    )
    show.set_defaults(handler=_show)

    migrate_parser = cmds.add_parser(
        "migrate",
        parents=[common],
        help="give a stopped service's queues a new delivery limit or retry tiers",
        description="Replace every queue of the service whose arguments differ from the "
        "given delivery limit and retry tiers, moving its messages to '<queue>.migrating' "
        "and back with publisher confirms: nothing is lost, nothing is deleted by hand. Stop "
        "every instance of the service first (checked); producers may keep running (new "
        "events wait in the holding queue). Defaults are the service's own settings "
        "($TRIBUTARY_DELIVERY_LIMIT, $TRIBUTARY_RETRY_TIERS). Messages moved get a fresh "
        "delivery count and a retry tier's full new delay. Run it again after an "
        "interruption: it finishes the migration.",
    )
    migrate_parser.add_argument(
        "--delivery-limit",
        type=positive,
        metavar="N",
        help="redeliveries before the broker dead-letters a message (x-delivery-limit)",
    )
    migrate_parser.add_argument(
        "--retry-tiers",
        type=_tiers,
        metavar="SECONDS,...",
        help="delays of the retry queues <base>.retry.1, .2, ... (e.g. 1,10,60)",
    )
    migrate_parser.add_argument(
        "--batch",
        type=positive,
        default=100,
        metavar="N",
        help="publisher confirms in flight (default 100)",
    )
    migrate_parser.add_argument(
        "--dry-run", action="store_true", help="only show what would change; change nothing"
    )
    migrate_parser.set_defaults(handler=_migrate)
