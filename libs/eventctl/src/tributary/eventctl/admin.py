"""What AMQP cannot show: queue arguments and bindings, read with rabbitmqctl or over HTTP.

Two ways in, the same answers: ``rabbitmqctl`` on the broker's host (works without the
management plugin, as root or as the ``rabbitmq`` user, which holds the node's Erlang cookie),
or the management HTTP API when a URL is given (any host; the user needs the ``monitoring``
tag or better).
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

COMMAND_TIMEOUT = 120.0


class AdminError(RuntimeError):
    """rabbitmqctl or the management API failed or answered something unexpected."""


@dataclass(frozen=True)
class QueueInfo:
    name: str
    arguments: dict[str, Any]
    messages: int
    consumers: int
    policy: str


@dataclass(frozen=True)
class Binding:
    """A binding from a named exchange to a queue (the default exchange's are implicit)."""

    exchange: str
    routing_key: str
    arguments: dict[str, Any]


class BrokerAdmin(Protocol):
    vhost: str

    async def queues(self) -> dict[str, QueueInfo]:
        """Every queue of the vhost, by name."""
        ...

    async def bindings(self, queue: str) -> list[Binding]:
        """The bindings to ``queue`` from named exchanges."""
        ...


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none), as aio-pika reads it."""
    return unquote(urlsplit(amqp_url).path[1:]) or "/"


def _count(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0  # "" while a quorum queue has no leader


def _table(arguments: object) -> dict[str, Any]:
    """rabbitmqctl prints ``[[name, type, value], ...]``; the HTTP API a JSON object."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if isinstance(arguments, list):
        return {str(row[0]): row[-1] for row in arguments if isinstance(row, list) and row}
    raise AdminError(f"unexpected arguments listing: {arguments!r}")


class Rabbitmqctl:
    """``rabbitmqctl`` (``-n node`` when given) with the JSON formatter."""

    def __init__(
        self,
        vhost: str,
        *,
        executable: str = "rabbitmqctl",
        node: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.vhost = vhost
        self._command = [executable, *(("-n", node) if node else ())]
        self._env = dict(env) if env is not None else None

    async def _json(self, *args: str) -> list[dict[str, Any]]:
        command = [*self._command, *args, "-p", self.vhost, "--formatter", "json", "-q"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise AdminError(f"cannot run {self._command[0]}: {exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AdminError(f"{' '.join(args[:1])}: no answer in {COMMAND_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            detail = (err or out).decode(errors="replace").strip()
            raise AdminError(f"rabbitmqctl {args[0]} failed ({proc.returncode}): {detail}")
        try:
            rows = json.loads(out or b"[]")
        except json.JSONDecodeError as exc:
            raise AdminError(f"rabbitmqctl {args[0]}: not JSON: {exc}") from None
        if not isinstance(rows, list):
            raise AdminError(f"rabbitmqctl {args[0]}: expected a list, got {type(rows).__name__}")
        return rows

    async def queues(self) -> dict[str, QueueInfo]:
        rows = await self._json(
            "list_queues", "name", "arguments", "messages", "consumers", "policy"
        )
        return {
            row["name"]: QueueInfo(
                name=row["name"],
                arguments=_table(row.get("arguments", [])),
                messages=_count(row.get("messages")),
                consumers=_count(row.get("consumers")),
                policy=str(row.get("policy") or ""),
            )
            for row in rows
        }

    async def bindings(self, queue: str) -> list[Binding]:
        rows = await self._json(
            "list_bindings",
            "source_name",
            "destination_name",
            "destination_kind",
            "routing_key",
            "arguments",
        )
        return [
            Binding(row["source_name"], row["routing_key"], _table(row.get("arguments", [])))
            for row in rows
            if row["destination_kind"] == "queue"
            and row["destination_name"] == queue
            and row["source_name"] != ""
        ]


class ManagementApi:
    """The management plugin's HTTP API (``http://user:password@host:15672``).

    Credentials come from the URL, else from the AMQP URL the other commands use.
    """

    def __init__(self, url: str, vhost: str, *, credentials_from: str | None = None) -> None:
        self.vhost = vhost
        parts = urlsplit(url)
        source = parts if parts.username else urlsplit(credentials_from or "")
        user, password = unquote(source.username or "guest"), unquote(source.password or "guest")
        if parts.scheme not in ("", "http", "https"):
            raise AdminError(f"management API URL must be http(s), not {parts.scheme}:")
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        self._base = f"{parts.scheme or 'http'}://{netloc}{parts.path.rstrip('/')}/api"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    def _get_sync(self, path: str) -> Any:
        # the base URL is http(s) only (checked in __init__): no file: or custom schemes
        request = urllib.request.Request(  # noqa: S310
            self._base + path, headers={"Authorization": self._auth, "Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=COMMAND_TIMEOUT) as response:  # noqa: S310
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise AdminError(f"management API GET {path}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise AdminError(f"management API GET {path}: {exc}") from None

    async def _get(self, path: str) -> Any:
        return await asyncio.to_thread(self._get_sync, path)

    def _vhost(self) -> str:
        return quote(self.vhost, safe="")

    async def queues(self) -> dict[str, QueueInfo]:
        rows = await self._get(
            f"/queues/{self._vhost()}?columns=name,arguments,messages,consumers,policy"
        )
        return {
            row["name"]: QueueInfo(
                name=row["name"],
                arguments=_table(row.get("arguments") or {}),
                messages=_count(row.get("messages")),
                consumers=_count(row.get("consumers")),
                policy=str(row.get("policy") or ""),
            )
            for row in _rows(rows)
        }

    async def bindings(self, queue: str) -> list[Binding]:
        rows = await self._get(f"/queues/{self._vhost()}/{quote(queue, safe='')}/bindings")
        return [
            Binding(row["source"], row["routing_key"], _table(row.get("arguments") or {}))
            for row in _rows(rows)
            if row.get("source")
        ]


def _rows(value: Any) -> Sequence[dict[str, Any]]:
    if not isinstance(value, list):
        raise AdminError(f"management API: expected a list, got {type(value).__name__}")
    return value


def broker_admin(
    amqp_url: str,
    *,
    management_url: str | None = None,
    rabbitmqctl: str = "rabbitmqctl",
    node: str | None = None,
) -> BrokerAdmin:
    """The management API when a URL is given, else rabbitmqctl on this host."""
    vhost = vhost_of(amqp_url)
    if management_url:
        return ManagementApi(management_url, vhost, credentials_from=amqp_url)
    return Rabbitmqctl(vhost, executable=rabbitmqctl, node=node)
