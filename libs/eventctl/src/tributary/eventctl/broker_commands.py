"""The ``broker`` command group: ``broker definitions`` and ``broker provision``.

One broker user per service, per foreign producer and one operator, each allowed only what
the catalog says it does (:mod:`tributary.eventctl.access`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tributary.contracts.catalog import CatalogError, catalog
from tributary.eventctl.access import (
    AccessError,
    AccessPlan,
    definitions,
    passwords,
    plan_access,
    render,
)
from tributary.eventctl.admin import AdminError, vhost_of
from tributary.eventctl.broker import broker_options
from tributary.eventctl.credentials import choose_backend
from tributary.eventctl.provision import provision

EXIT_OK, EXIT_ERROR = 0, 2

DEMO_WARNING = (
    "eventctl: demo passwords (derived from the user names, public): for the local demo only; "
    "use --passwords-from-env anywhere else"
)


def user_prefix(given: str | None) -> str:
    """``broker provision``'s user prefix: --prefix, else the services'
    ``TRIBUTARY_BROKER_USER_PREFIX`` (``make dev``'s ``var/eventctl.env`` sets it), so a repair
    fixes the users the services log in as rather than creating unprefixed ones beside them."""
    return given if given is not None else os.environ.get("TRIBUTARY_BROKER_USER_PREFIX", "")


def _plan(args: argparse.Namespace, vhost: str, prefix: str) -> AccessPlan:
    name_prefix = broker_options(None, args.name_prefix).prefix
    return plan_access(
        catalog(),
        vhost=vhost,
        user_prefix=prefix,
        name_prefix=name_prefix,
    )


def _definitions(args: argparse.Namespace) -> int:
    try:
        plan = _plan(args, args.vhost, args.prefix or "")
        secrets = passwords(plan, from_env=args.passwords_from_env)
    except (CatalogError, AccessError) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not args.passwords_from_env:
        print(DEMO_WARNING, file=sys.stderr)
    text = render(definitions(plan, secrets, demo=not args.passwords_from_env))
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {args.out}: {len(plan.users)} users on vhost {plan.vhost}")
    return EXIT_OK


async def _provision(args: argparse.Namespace) -> int:
    url = broker_options(args.url, None).url
    vhost = args.vhost if args.vhost is not None else vhost_of(url)
    try:
        plan = _plan(args, vhost, user_prefix(args.prefix))
        secrets = passwords(plan, from_env=args.passwords_from_env)
    except (CatalogError, AccessError) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not args.passwords_from_env:
        print(DEMO_WARNING, file=sys.stderr)
    try:
        backend = choose_backend(
            url, management_url=args.management_url, rabbitmqctl=args.rabbitmqctl, node=args.node
        )
        changes = await provision(plan, secrets, backend)
    except AdminError as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for change in changes:
        print(change)
    users = len(plan.users)
    print(f"provisioned vhost {vhost}: {users} users, {len(changes)} change(s)")
    return EXIT_OK


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        metavar="P",
        help="user name prefix, e.g. the vhost's name and a dot (user names are cluster-wide; "
        "default: none for definitions; for provision $TRIBUTARY_BROKER_USER_PREFIX, as the "
        "services have it, or none)",
    )
    parser.add_argument(
        "--name-prefix",
        metavar="N",
        help="exchange and queue name prefix the services use (default: $TRIBUTARY_NAME_PREFIX)",
    )
    parser.add_argument(
        "--passwords-from-env",
        action="store_true",
        help="passwords from TRIBUTARY_BROKER_PASSWORD_<USER> (default: public demo passwords)",
    )


def add_broker_commands(groups: Any) -> None:
    broker = groups.add_parser("broker", help="broker users and their permissions")
    commands = broker.add_subparsers(dest="command", metavar="COMMAND", required=True)

    defs = commands.add_parser(
        "definitions",
        help="write a RabbitMQ definitions file with every user and its permissions",
        description=(
            "Users (one per service, per foreign producer, and the operator eventctl), the "
            "vhost, permissions and topic permissions, derived from the catalog, as a file "
            "for rabbitmqctl import_definitions or the load_definitions setting."
        ),
    )
    defs.add_argument("--vhost", default="/", metavar="V", help="virtual host (default /)")
    _common(defs)
    defs.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    defs.set_defaults(handler=_definitions)

    prov = commands.add_parser(
        "provision",
        help="create or fix the users and permissions on a running broker (idempotent)",
        description=(
            "Apply what `broker definitions` describes to a running broker, through the "
            "management API (--management-url) or rabbitmqctl on the broker's host: creates "
            "the vhost and missing users, fixes passwords, tags and permissions, and prints "
            "every change. A second run changes nothing."
        ),
    )
    prov.add_argument("--url", help="AMQP URL naming the vhost (default: $RABBITMQ_URL)")
    prov.add_argument("--vhost", metavar="V", help="virtual host (default: the URL's)")
    _common(prov)
    prov.add_argument(
        "--management-url",
        metavar="URL",
        help="management HTTP API (http://user:password@host:15672; an administrator); "
        "default: port 15672 of the broker's host when it answers, else rabbitmqctl here",
    )
    prov.add_argument("--rabbitmqctl", default="rabbitmqctl", help="rabbitmqctl executable")
    prov.add_argument("--node", help="broker node for rabbitmqctl -n")
    prov.set_defaults(handler=_provision)
