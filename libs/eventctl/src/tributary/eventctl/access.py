"""Who may do what on the broker: one user per service, per foreign producer, and an operator.

Everything is derived from the catalog (who publishes and consumes which type) and from the
names the runtime declares (:mod:`tributary.messaging.topology`). RabbitMQ checks three
regexes per user and vhost -- configure, write, read -- against exchange and queue names, and
on a topic exchange one more pair against routing keys (topic permissions). What each AMQP
method needs (RabbitMQ's access-control table):

==========================  ==========================================================
queue.declare / exch.declare  configure on the queue / exchange (passive: nothing)
queue.declare with a DLX    also write on the dead-letter exchange and read on the queue
queue.bind                  write on the queue, read on the exchange; on a topic exchange
                            also the topic ``read`` regex on the binding key
basic.publish               write on the exchange (the default one is ``amq.default``); on a
                            topic exchange also the topic ``write`` regex on the routing key
basic.consume / basic.get   read on the queue
==========================  ==========================================================

The operator (``eventctl``) has every right on the vhost and no topic restriction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tributary.contracts.catalog import Catalog, TypeSpec
from tributary.messaging.topology import Names

NOTHING = "^$"
"""Matches no name RabbitMQ checks (its own spelling of "no permission")."""
EVERYTHING = ".*"
DEFAULT_EXCHANGE = "amq.default"
OPERATOR = "eventctl"
HASHING = "rabbit_password_hashing_sha256"
PASSWORD_ENV = "TRIBUTARY_BROKER_PASSWORD_"  # noqa: S105 (a variable name)

Kind = Literal["service", "producer", "operator"]


class AccessError(RuntimeError):
    """A password is missing or the plan cannot be built."""


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermissions:
    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class BrokerUser:
    role: str
    """The unprefixed name: a service, a foreign producer, ``eventctl`` or ``guest``."""
    name: str
    """The broker user name: ``<prefix><role>``."""
    kind: Kind
    tags: tuple[str, ...]
    permissions: Permissions
    topic: TopicPermissions | None
    publishes: tuple[str, ...] = ()
    """Routing keys (types) it may publish on the events exchange, for documentation."""


@dataclass(frozen=True)
class AccessPlan:
    vhost: str
    users: tuple[BrokerUser, ...]

    def user(self, role: str) -> BrokerUser:
        for user in self.users:
            if user.role == role:
                return user
        raise KeyError(role)


def _alternatives(patterns: Iterable[str]) -> str:
    """``^(?:a|b)$`` of already escaped ``patterns``; :data:`NOTHING` when there are none."""
    unique = sorted(set(patterns))
    return f"^(?:{'|'.join(unique)})$" if unique else NOTHING


def _own_queues(
    names: Names, service: str, consumed: Iterable[TypeSpec], *, partitioned: bool = False
) -> list[str]:
    """Regexes of the queues ``service`` declares (topology.Names): its event queue set when it
    subscribes to any event, one command queue set per command it handles."""
    specs = list(consumed)
    patterns: list[str] = []
    if any(spec.kind == "event" for spec in specs):
        base = re.escape(f"{names.prefix}{service}")
        patterns.append(rf"{base}\.(?:events|dlq|retry\.[0-9]+)")
        if partitioned:  # <service>.events.p<k> and its tiers <service>.events.p<k>.retry.<n>
            patterns.append(rf"{base}\.events\.p[0-9]+(?:\.retry\.[0-9]+)?")
    for spec in specs:
        if spec.kind == "command":
            base = re.escape(f"{names.prefix}{spec.name}")
            patterns.append(rf"{base}(?:\.dlq|\.retry\.[0-9]+)?")
    return patterns


def _routing_keys(specs: Iterable[TypeSpec]) -> str:
    """Topic ``write``: ``<type>.v<N>`` of exactly these types (``<type>.v<N>.s<slot>`` for a
    partitioned type)."""
    return _alternatives(
        rf"{re.escape(spec.name)}\.v[0-9]+{_SLOT if spec.partitioned else ''}" for spec in specs
    )


def _binding_keys(specs: Iterable[TypeSpec]) -> str:
    """Topic ``read``: the binding keys a consumer uses (``<type>.*``, or one version; for a
    partitioned type also ``<type>.*.*`` and ``<type>.*.s<slot>``)."""
    return _alternatives(
        rf"{re.escape(spec.name)}\.(?:\*|v[0-9]+){_SLOT_BINDING if spec.partitioned else ''}"
        for spec in specs
    )


_SLOT = r"(?:\.s[0-9]+)?"
"""The slot word a producer appends to a partitioned type's routing key."""
_SLOT_BINDING = r"(?:\.(?:\*|s[0-9]+))?"


def service_user(cat: Catalog, service: str, names: Names, user_prefix: str) -> BrokerUser:
    events, dlx = re.escape(names.exchange), re.escape(names.dlx)
    consumed = cat.consumed_by(service)
    published = cat.published_by(service)
    queues = _own_queues(
        names, service, consumed, partitioned=bool(cat.partitioning.partitions(service))
    )
    # configure: Bus.start declares both exchanges (declare_exchanges, always) and its own
    # queues (declare_queue_set). Configure on the shared exchanges also allows deleting
    # them; services declare them non-passively, so this stays until provisioning owns them.
    configure = _alternatives([events, dlx, *queues])
    # write: the relay publishes to the events exchange; a dead-lettered copy goes to the DLX;
    # retries and the DLQ sweep's put-back go through the default exchange, and declaring a
    # retry queue (dead-letter exchange "") needs write on it too, as declaring a work queue
    # (dead-letter exchange tributary.dlx) needs write on the DLX; binding a queue needs write
    # on the queue.
    write = _alternatives([events, dlx, re.escape(DEFAULT_EXCHANGE), *queues])
    # read: consuming and basic.get (DLQ sweep) read its queues; binding the work queue to the
    # events exchange and the DLQ to the DLX reads the exchanges; declaring a queue with a
    # dead-letter exchange reads the queue. A service without queues reads nothing.
    read = _alternatives([events, dlx, *queues]) if queues else NOTHING
    return BrokerUser(
        role=service,
        name=f"{user_prefix}{service}",
        kind="service",
        tags=(),
        permissions=Permissions(configure, write, read),
        # the broker checks every publish to the events exchange against its own types, and
        # every binding to it against the types it consumes
        topic=TopicPermissions(
            names.exchange,
            write=_routing_keys(published),
            # command queues are bound to the events exchange too (``email.send.*``)
            read=_binding_keys(consumed),
        ),
        publishes=tuple(spec.name for spec in published),
    )


def producer_user(cat: Catalog, producer: str, names: Names, user_prefix: str) -> BrokerUser:
    published = cat.published_by(producer)
    return BrokerUser(
        role=producer,
        name=f"{user_prefix}{producer}",
        kind="producer",
        tags=(),
        # it only publishes: no declaring, no reading, one exchange
        permissions=Permissions(NOTHING, f"^{re.escape(names.exchange)}$", NOTHING),
        topic=TopicPermissions(names.exchange, write=_routing_keys(published), read=NOTHING),
        publishes=tuple(spec.name for spec in published),
    )


def plan_access(
    cat: Catalog,
    *,
    vhost: str = "/",
    user_prefix: str = "",
    name_prefix: str = "",
) -> AccessPlan:
    """Every user of ``vhost``: services, foreign producers and the operator."""
    names = Names(name_prefix)
    users = [service_user(cat, s, names, user_prefix) for s in cat.services]
    users += [producer_user(cat, p, names, user_prefix) for p in sorted(cat.external_producers)]
    users.append(
        BrokerUser(
            role=OPERATOR,
            name=f"{user_prefix}{OPERATOR}",
            kind="operator",
            # `eventctl queue show --management-url` reads queues over HTTP: the management
            # tag shows the vhosts it has permissions in (nothing cluster-wide)
            tags=("management",),
            permissions=Permissions(EVERYTHING, EVERYTHING, EVERYTHING),
            topic=None,  # no topic permission: every routing key (replays, DLQ moves)
        )
    )
    return AccessPlan(vhost=vhost, users=tuple(users))


# --------------------------------------------------------------------------- passwords


def password_variable(role: str) -> str:
    """``TRIBUTARY_BROKER_PASSWORD_COMMENTS_APP`` for ``comments-app``."""
    return PASSWORD_ENV + re.sub(r"[^A-Z0-9]", "_", role.upper())


def demo_password(user_name: str) -> str:
    """The demo password of a user: public by construction, for the local demo only."""
    return hashlib.sha256(f"tributary demo broker password:{user_name}".encode()).hexdigest()[:24]


def passwords(
    plan: AccessPlan, *, from_env: bool, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Password per user name: from ``TRIBUTARY_BROKER_PASSWORD_<ROLE>`` or the demo ones."""
    if not from_env:
        return {user.name: demo_password(user.name) for user in plan.users}
    env = os.environ if environ is None else environ
    missing = [
        password_variable(u.role) for u in plan.users if not env.get(password_variable(u.role))
    ]
    if missing:
        raise AccessError(f"no password in the environment: {', '.join(missing)}")
    return {user.name: env[password_variable(user.role)] for user in plan.users}


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def demo_salt(user_name: str) -> bytes:
    """A fixed salt, so the committed demo definitions are reproducible byte for byte."""
    return hashlib.sha256(f"tributary demo broker salt:{user_name}".encode()).digest()[:4]


def hash_matches(password: str, encoded: str) -> bool:
    """Whether ``encoded`` (a sha256 hash as RabbitMQ stores it) is ``password``'s."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        return False
    return len(raw) == 36 and password_hash(password, raw[:4]) == encoded


# --------------------------------------------------------------------------- definitions


def definitions(plan: AccessPlan, secrets: Mapping[str, str], *, demo: bool) -> dict[str, Any]:
    """The definitions document (``rabbitmqctl import_definitions``, ``load_definitions``).

    Exchanges, queues and bindings are left out: every service declares its own.
    """
    users = []
    for user in plan.users:
        salt = demo_salt(user.name) if demo else os.urandom(4)
        users.append(
            {
                "name": user.name,
                "password_hash": password_hash(secrets[user.name], salt),
                "hashing_algorithm": HASHING,
                "tags": list(user.tags),
                "limits": {},
            }
        )
    return {
        "users": users,
        "vhosts": [{"name": plan.vhost}],
        "permissions": [
            {
                "user": user.name,
                "vhost": plan.vhost,
                "configure": user.permissions.configure,
                "write": user.permissions.write,
                "read": user.permissions.read,
            }
            for user in plan.users
        ],
        "topic_permissions": [
            {
                "user": user.name,
                "vhost": plan.vhost,
                "exchange": user.topic.exchange,
                "write": user.topic.write,
                "read": user.topic.read,
            }
            for user in plan.users
            if user.topic is not None
        ],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [],
        "exchanges": [],
        "bindings": [],
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"
