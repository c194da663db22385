"""``eventctl publish``: one event, checked against its contract, published with a confirm.

Tooling for producers outside this repo (and for operators): the data file is foreign input.
Whatever it holds, the command either publishes one valid CloudEvent or exits 2 with the
reasons, and publishes nothing:

1. the type and version must be in the catalog, an event (commands are sent by their
   senders through the runtime), the version active or deprecated (default: the newest);
2. ``--data`` must be a JSON object within the envelope's limits (size, depth, no NaN);
3. it must validate against the version's JSON Schema (strict, as producers validate):
   every violation is printed, by path and rule, never with the value (it may be PII);
4. the producer must be allowed to publish the type (the catalog's ``producers``): the
   connection's broker user (without ``TRIBUTARY_BROKER_USER_PREFIX``), or, connected as
   the operator (``eventctl``), the one ``--producer`` names, which is recorded in the
   ``x-tributary-producer`` header the consumers' sender check trusts on the operator's
   copies.

It publishes to the events exchange with the version's routing key, ``mandatory`` and with
a publisher confirm: unroutable (no queue bound) or refused is an error, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from pydantic import ValidationError

from tributary.contracts.catalog import NAMESPACE, CatalogError, TypeSpec, VersionSpec, catalog
from tributary.contracts.envelope import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    CloudEvent,
    MalformedEvent,
    new_event,
    parse_event,
)
from tributary.contracts.validation import _describe, validator_for
from tributary.eventctl.access import OPERATOR
from tributary.eventctl.broker import broker_options
from tributary.eventctl.commands import _broker_arguments, _guarded
from tributary.messaging import headers as h
from tributary.messaging.partitions import wire_routing_key
from tributary.messaging.publisher import Publisher, event_message
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names

EXIT_OK, EXIT_REFUSED = 0, 2
MAX_REPORTED = 20
"""Schema violations printed at most (the count of the rest follows)."""


class Refused(Exception):
    """The event is not published; ``reasons`` say why (one line each)."""

    def __init__(self, *reasons: str) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


# -- the type and version ---------------------------------------------------------------------


def resolve_version(name: str, version: int | None) -> VersionSpec:
    """``user.created`` (+ ``--version``), ``user.created.v2`` or its CloudEvents type."""
    name = name.removeprefix(f"{NAMESPACE}.")
    stem, sep, digits = name.rpartition(".v")
    if sep and digits.isascii() and digits.isdigit() and stem:
        if version is not None and str(version) != digits.lstrip("0"):
            raise Refused(f"--type {name!r} names version {digits}, --version {version}")
        name, version = stem, int(digits)
    try:
        spec = catalog().type(name)
    except CatalogError as exc:
        known = ", ".join(sorted(t.name for t in catalog() if t.kind == "event"))
        raise Refused(f"{exc} (known events: {known})") from None
    if spec.kind != "event":
        raise Refused(
            f"{spec.name} is a command: its senders ({', '.join(spec.producers)}) send it "
            "through the runtime, not eventctl publish"
        )
    if version is None:
        return spec.latest
    if version not in spec.versions:
        known_versions = ", ".join(str(v) for v in sorted(spec.versions))
        raise Refused(f"{spec.name} has no version {version} (versions: {known_versions})")
    return spec.versions[version]


# -- the data ---------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """How deep ``value`` nests (iteratively: a deep document must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH + 1:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def load_data(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; :class:`Refused` with the reason otherwise."""
    if len(raw) > MAX_BODY_BYTES:
        raise Refused(f"--data is {len(raw):,} bytes, more than an event may hold")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"--data is not UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise Refused(f"--data nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, NaN, an integer too long to read
        raise Refused(f"--data is not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise Refused(f"--data is a JSON {type(data).__name__}: an event's data is an object")
    if _depth(data) > MAX_DEPTH:
        raise Refused(f"--data nests deeper than {MAX_DEPTH} levels")
    return data


def _lines(error: Any) -> list[str]:
    """One line per problem; a ``required`` error names every missing property."""
    if error.validator == "required" and isinstance(error.instance, dict):
        base = ".".join(["data", *(str(p) for p in error.absolute_path)])
        missing = [str(p) for p in error.validator_value if p not in error.instance]
        return [f"{base}.{name[:100]}: is required (required)" for name in missing]
    field, detail = _describe(error)
    return [f"{field}: {detail} ({error.validator})"]


def violations(version: VersionSpec, data: dict[str, Any]) -> list[str]:
    """Every schema violation of ``data``, as ``path: what (rule)``, without values."""
    validator = validator_for(version.routing_key, "strict")
    lines: list[str] = []
    try:
        errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path)))
        for error in errors:
            lines.extend(line for line in _lines(error) if line not in lines)
    except (RecursionError, TypeError, ValueError) as exc:
        return [f"data: cannot be evaluated ({type(exc).__name__})"]
    if len(lines) > MAX_REPORTED:
        return [*lines[:MAX_REPORTED], f"… and {len(lines) - MAX_REPORTED} more"]
    return lines


# -- who publishes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    producer: str
    """The catalog name the consumers' sender check will see."""
    header: str | None
    """``x-tributary-producer``, when the operator publishes for a producer."""
    warning: str | None = None


def sender(spec: TypeSpec, user: str, user_prefix: str, producer: str | None) -> Sender:
    """Who the consumers will take as the producer, if the catalog lets them publish."""
    name = user.removeprefix(user_prefix) if user_prefix else user
    allowed = ", ".join(spec.producers) or "nobody"
    warning = None
    if name == OPERATOR:
        if producer is None:
            raise Refused(
                f"connected as the operator ({user}): name the producer with --producer "
                f"(may publish {spec.name}: {allowed})"
            )
        chosen, header = producer, producer
    elif producer is not None and producer != name:
        # the header counts only on the operator's copies: a broker checking senders takes
        # the connection's user; a development broker (guest, no check) takes the header
        chosen, header = producer, producer
        warning = (
            f"connected as {user}, not as {producer} or the operator: consumers that check "
            f"senders take {name} as the producer"
        )
    else:
        chosen, header = name, None
    if chosen not in spec.producers:
        hint = (
            "" if producer else " (connect as its broker user, or as the operator with --producer)"
        )
        raise Refused(f"{chosen} may not publish {spec.name}: its producers are {allowed}{hint}")
    return Sender(chosen, header, warning)


def default_source(producer: str) -> str:
    if producer in catalog().external_producers:
        return f"/external/{producer}"
    return f"/services/{producer}"


# -- the command ------------------------------------------------------------------------------


def build(
    version: VersionSpec, data: dict[str, Any], args: argparse.Namespace, source: str
) -> CloudEvent[dict[str, Any]]:
    """The CloudEvent, checked the way every consumer parses it."""
    try:
        event = new_event(
            routing_key=version.routing_key,
            source=source,
            data=data,
            subject=args.subject,
            correlationid=args.correlation_id or uuid.uuid4().hex,
            idempotencykey=args.idempotency_key,
            event_id=args.id,
        )
        return parse_event(event.to_bytes())
    except (ValidationError, MalformedEvent, ValueError) as exc:
        first = str(exc).splitlines()[0][:300]
        raise Refused(f"not a valid CloudEvent: {first}") from None


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
    try:
        with Path(path).open("rb") as fh:
            return fh.read(MAX_BODY_BYTES + 1)
    except OSError as exc:
        raise Refused(f"--data {path}: {exc.strerror or exc}") from None


@_guarded
async def publish_command(args: argparse.Namespace) -> int:
    options = broker_options(args.url, args.prefix)
    user = unquote(urlsplit(options.url).username or "guest")
    user_prefix = (
        args.user_prefix if args.user_prefix is not None else MessagingSettings().broker_user_prefix
    )
    try:
        version = resolve_version(args.type, args.version)
        data = load_data(_read(args.data))
        found = violations(version, data)
        if found:
            raise Refused(*(f"invalid: {line}" for line in found))
        who = sender(catalog().type(version.type), user, user_prefix, args.producer)
        event = build(version, data, args, args.source or default_source(who.producer))
    except Refused as exc:
        for reason in exc.reasons:
            print(f"eventctl: {reason}", file=sys.stderr)
        print("eventctl: refused: nothing published", file=sys.stderr)
        return EXIT_REFUSED
    if who.warning:
        print(f"eventctl: warning: {who.warning}", file=sys.stderr)
    body = event.to_bytes()
    if args.dry_run:
        print(body.decode())
        print(f"valid {version.ce_type} (dry run: nothing published)", file=sys.stderr)
        return EXIT_OK
    headers: dict[str, Any] = {h.ROUTING_KEY: version.routing_key}
    if who.header is not None:
        headers[h.PRODUCER] = who.header
    message = event_message(
        body,
        event_id=event.id,
        routing_key=version.routing_key,
        app_id=who.producer,
        correlation_id=event.correlationid,
        timestamp=event.time,
        headers=headers,
    )
    exchange = Names(options.prefix).exchange
    connection = await aio_pika.connect(
        options.url, client_properties={"connection_name": "eventctl publish"}
    )
    try:
        publisher = Publisher(connection, in_flight=1)
        await publisher.open()
        try:
            # a partitioned type goes under its slot, as the relay would send it
            routing_key = wire_routing_key(version.routing_key, message.body)
            await publisher.publish(exchange, routing_key, message)
        finally:
            await publisher.close()
    finally:
        await connection.close()
    print(
        f"published {version.ce_type} {event.id} to {exchange} "
        f"(routing key {version.routing_key}) as {who.producer}: confirmed"
    )
    return EXIT_OK


def add_publish_command(groups: Any) -> None:
    parser = groups.add_parser(
        "publish",
        parents=[_broker_arguments()],
        help="publish one event, validated against its contract first",
        description="Build a CloudEvent of --type from the JSON object in --data, validate it "
        "against the type's JSON Schema in the catalog, check that the producer may publish "
        "it, and publish it to the events exchange with its routing key and a publisher "
        "confirm. Anything invalid is refused (exit 2, every reason printed) and nothing is "
        "published. Exit 0 published (or valid, with --dry-run), 2 refused or not confirmed.",
    )
    parser.add_argument(
        "--type",
        required=True,
        metavar="TYPE",
        help="event type: user.created, user.created.v2 or com.tributary.user.created.v2",
    )
    parser.add_argument(
        "--version", type=int, metavar="N", help="the type's version (default: the newest)"
    )
    parser.add_argument(
        "--data", required=True, metavar="FILE", help="the event's data: a JSON object (- stdin)"
    )
    parser.add_argument("--subject", metavar="S", help="the CloudEvents subject")
    parser.add_argument("--correlation-id", metavar="ID", help="default: a new one")
    parser.add_argument("--idempotency-key", metavar="KEY", help="the idempotencykey extension")
    parser.add_argument("--id", metavar="ID", help="the event id (default: a new UUID)")
    parser.add_argument(
        "--producer",
        metavar="NAME",
        help="who produces it, as the catalog names them (comments-app, identity, …): "
        "needed when connected as the operator (default: the broker user of --url)",
    )
    parser.add_argument(
        "--source",
        metavar="URI",
        help="the CloudEvents source (default /external/<producer> for a foreign producer, "
        "/services/<producer> for a service)",
    )
    parser.add_argument(
        "--user-prefix",
        metavar="PREFIX",
        help="prefix of broker user names (default: $TRIBUTARY_BROKER_USER_PREFIX or none)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the CloudEvent; publish nothing",
    )
    parser.set_defaults(handler=publish_command)
