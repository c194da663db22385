"""``eventctl broker provision`` against the real broker (rabbitmqctl), then the users it made
put to the test over AMQP: each may do what the catalog says and the broker refuses the rest.

Every test works in a fresh vhost with a unique user prefix and removes both in the end;
guest and every other user or vhost are left alone.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import AMQPError, ChannelAccessRefused

from tributary.eventctl.access import demo_password
from tributary.eventctl.broker_commands import user_prefix
from tributary.eventctl.cli import main_async
from tributary.messaging.topology import Names, declare_exchanges, declare_queue_set
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

NAMES = Names("")
Connect = Callable[[str, str], Awaitable[AbstractConnection]]
TIERS = (1.0,)


def _ctl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args], input=stdin, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def vhost(rabbitmq: Found) -> Iterator[str]:
    """A fresh vhost whose name is also the user prefix; deleted with its users afterwards."""
    assert rabbitmq.controllable, "these tests provision the local broker with rabbitmqctl"
    name = f"t-provision-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, check=False)
        users = json.loads(_ctl("list_users", "--formatter", "json", "-q"))
        ours = [str(u["user"]) for u in users if str(u["user"]).startswith(f"{name}.")]
        if ours:  # one call for all of them (each rabbitmqctl call starts a VM)
            names = ", ".join(f'<<"{user}">>' for user in ours)
            _ctl(
                "eval",
                f'[rabbit_auth_backend_internal:delete_user(U, <<"test">>) || U <- [{names}]].',
            )


async def _provision(rabbitmq: Found, vhost: str, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["broker", "provision", "--url", rabbitmq.url, "--vhost", vhost]
    code = await main_async([*args, "--prefix", f"{vhost}.", "--name-prefix", ""])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _url(rabbitmq: Found, vhost: str, role: str) -> str:
    user = f"{vhost}.{role}"
    broker = urlsplit(rabbitmq.url)
    host = f"{broker.hostname}:{broker.port or 5672}"
    return f"amqp://{quote(user, safe='')}:{demo_password(user)}@{host}/{quote(vhost, safe='')}"


@pytest.fixture
async def connect(rabbitmq: Found) -> AsyncIterator[Connect]:
    opened: list[AbstractConnection] = []

    async def open_as(vhost: str, role: str) -> AbstractConnection:
        connection = await aio_pika.connect(_url(rabbitmq, vhost, role))
        opened.append(connection)
        return connection

    yield open_as
    for connection in opened:
        await connection.close()


async def _publish(connection: AbstractConnection, routing_key: str, body: bytes = b"{}") -> None:
    """Publish with confirms on a channel of its own; a refusal raises."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(NAMES.exchange, ensure=False)
        await exchange.publish(aio_pika.Message(body), routing_key)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _declare(connection: AbstractConnection, service: str, keys: list[str]) -> None:
    await declare_exchanges(connection, NAMES)
    await declare_queue_set(
        connection,
        NAMES,
        NAMES.service_queues(service, len(TIERS)),
        binding_keys=keys,
        tier_seconds=TIERS,
        delivery_limit=5,
    )


async def _get(connection: AbstractConnection, queue: str) -> AbstractIncomingMessage:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    got: list[AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await declared.get(fail=False, no_ack=True)
        if message is not None:
            got.append(message)
        return bool(got)

    await eventually(arrived, timeout=10, what=f"a message in {queue}")
    await channel.close()
    return got[0]


async def test_provision_makes_users_that_may_do_only_their_part_and_repairs_drift(
    rabbitmq: Found,
    vhost: str,
    connect: Connect,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    first = await _provision(rabbitmq, vhost, capsys)
    assert f"vhost {vhost}: created" in first
    assert f"user {vhost}.identity: created" in first
    assert f"user {vhost}.comments-app: created" in first
    assert "topic permissions" in first
    assert "password" not in first.replace("password changed", "")  # never a password shown

    again = await _provision(rabbitmq, vhost, capsys)
    assert again.strip().splitlines() == [f"provisioned vhost {vhost}: 9 users, 0 change(s)"]

    open_as = connect
    onboarding = await open_as(vhost, "onboarding")
    audit = await open_as(vhost, "audit")
    identity = await open_as(vhost, "identity")
    comments = await open_as(vhost, "comments-app")

    # the real topology declaration works as each service's own user
    await _declare(onboarding, "onboarding", ["user.created.*", "user.erased.*"])
    await _declare(audit, "audit", ["comment.mentioned.*"])

    # identity publishes its own type; onboarding consumes it from its own queue
    await _publish(identity, "user.created.v2", b'{"n": 1}')
    message = await _get(onboarding, "onboarding.events")
    assert message.body == b'{"n": 1}'
    # a retry copy goes to its own retry tier through the default exchange
    channel = await onboarding.channel(publisher_confirms=True)
    await channel.default_exchange.publish(aio_pika.Message(b"retry"), "onboarding.retry.1")
    await channel.close()

    # another service's queue: refused
    channel = await onboarding.channel()
    queue = await channel.declare_queue("audit.events", passive=True)  # needs no right
    with pytest.raises(ChannelAccessRefused):
        await queue.get(fail=False)
    # a binding for a type it does not consume: refused (topic read)
    channel = await onboarding.channel()
    queue = await channel.declare_queue("onboarding.events", passive=True)
    with pytest.raises(ChannelAccessRefused):
        await queue.bind(NAMES.exchange, "user.email_changed.*")

    # another producer's type: refused (topic write); its own still goes through
    with pytest.raises((ChannelAccessRefused, AMQPError)):
        await _publish(onboarding, "user.created.v2")
    await _publish(onboarding, "workspace.created.v1")

    # a foreign producer publishes only its own types and declares nothing
    await _publish(comments, "comment.mentioned.v1", b'{"m": 1}')
    assert (await _get(audit, "audit.events")).body == b'{"m": 1}'
    with pytest.raises((ChannelAccessRefused, AMQPError)):
        await _publish(comments, "report.ready.v1")
    channel = await comments.channel()
    with pytest.raises(ChannelAccessRefused):
        await channel.declare_queue("comments.events", durable=True)

    # drift by hand is repaired, and nothing else is touched
    _ctl("set_permissions", "-p", vhost, f"{vhost}.billing", ".*", ".*", ".*")
    _ctl("change_password", f"{vhost}.audit", "changed-by-hand")
    _ctl("clear_topic_permissions", "-p", vhost, f"{vhost}.reports-app")

    out = await _provision(rabbitmq, vhost, capsys)
    lines = out.strip().splitlines()
    assert lines[-1] == f"provisioned vhost {vhost}: 9 users, 3 change(s)"
    assert f"user {vhost}.audit: password changed" in lines
    assert any(line.startswith(f"user {vhost}.billing: permissions on") for line in lines)
    assert any(line.startswith(f"user {vhost}.reports-app: topic permissions") for line in lines)
    assert "guest" not in out

    # the definitions file of the same users is what provision makes: after importing it
    # (after another change by hand) there is nothing left to provision
    _ctl("set_permissions", "-p", vhost, f"{vhost}.email", ".*", ".*", ".*")
    file = tmp_path / "definitions.json"
    args = ["broker", "definitions", "--vhost", vhost, "--prefix", f"{vhost}.", "--out", str(file)]
    assert await main_async([*args, "--name-prefix", ""]) == 0
    capsys.readouterr()
    # from standard input: rabbitmqctl reads files as the broker's user
    _ctl("import_definitions", "--format", "json", stdin=file.read_text(encoding="utf-8"))
    out = await _provision(rabbitmq, vhost, capsys)
    assert out.strip().splitlines() == [f"provisioned vhost {vhost}: 9 users, 0 change(s)"]


async def test_provision_takes_the_services_user_prefix_from_the_environment(
    rabbitmq: Found,
    vhost: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the runbook's repair after `set -a; . var/eventctl.env; set +a` (make dev): the prefixed
    # users the services log in as, never unprefixed ones beside them
    monkeypatch.setenv("TRIBUTARY_BROKER_USER_PREFIX", f"{vhost}.")
    args = ["broker", "provision", "--url", rabbitmq.url, "--vhost", vhost, "--name-prefix", ""]
    assert await main_async(args) == 0
    out = capsys.readouterr().out
    assert f"user {vhost}.email: created" in out
    assert "user email: " not in out
    # --prefix still wins, and definitions never read the variable
    assert user_prefix("x.") == "x."
    assert user_prefix("") == ""
    assert user_prefix(None) == f"{vhost}."
    assert await main_async(["broker", "definitions", "--vhost", vhost, "--name-prefix", ""]) == 0
    assert f'"{vhost}.email"' not in capsys.readouterr().out
