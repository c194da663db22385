"""Apply an :class:`~tributary.eventctl.access.AccessPlan` to a running broker, idempotently.

The broker's definitions are read once (``rabbitmqctl export_definitions`` or ``GET
/api/definitions``), compared with the plan, and only what differs -- a missing vhost or user,
a password that no longer verifies, other tags, permissions or topic permissions -- is written
back in one partial import (``rabbitmqctl import_definitions`` from standard input, or ``POST
/api/definitions``). Passwords travel only as salted hashes and are never printed. Users and
vhosts the plan does not name are never touched. A second run finds nothing to change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from tributary.eventctl.access import (
    HASHING,
    AccessPlan,
    BrokerUser,
    hash_matches,
    password_hash,
)
from tributary.eventctl.admin import COMMAND_TIMEOUT, AdminError

APPLY_TIMEOUT = 30.0
"""Seconds an import may take to show in the broker's definitions."""
EXPORT_ATTEMPTS = 3


class DefinitionsBackend(Protocol):
    async def export(self) -> dict[str, Any]:
        """Every definition of the broker (users with their password hashes included)."""
        ...

    async def load(self, document: dict[str, Any]) -> None:
        """Import ``document``: adds or overwrites what it names, leaves the rest."""
        ...

    async def delete_users(self, names: list[str]) -> None:
        """Delete these users (those that exist); nothing else."""
        ...


class RabbitmqctlDefinitions:
    """``rabbitmqctl`` on the broker's host (no management plugin needed)."""

    def __init__(
        self,
        *,
        executable: str = "rabbitmqctl",
        node: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._command = [executable, *(("-n", node) if node else ())]
        self._env = dict(env) if env is not None else None

    async def _run(self, *args: str, stdin: bytes | None = None) -> bytes:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise AdminError(f"cannot run {self._command[0]}: {exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AdminError(f"rabbitmqctl {args[0]}: no answer in {COMMAND_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            detail = (err or out).decode(errors="replace").strip()[:500]
            raise AdminError(f"rabbitmqctl {args[0]} failed ({proc.returncode}): {detail}")
        return out

    async def export(self) -> dict[str, Any]:
        for attempt in range(EXPORT_ATTEMPTS):
            out = await self._run("export_definitions", "-", "--format", "json", "-q")
            try:
                document = json.loads(out)
                break
            except json.JSONDecodeError as exc:
                # seen once on a busy shared broker; the next export was fine
                if attempt + 1 == EXPORT_ATTEMPTS:
                    shown = out[:200].decode(errors="replace")
                    raise AdminError(
                        f"rabbitmqctl export_definitions: not JSON: {exc}: {shown!r}"
                    ) from None
        if not isinstance(document, dict):
            raise AdminError("rabbitmqctl export_definitions: not a definitions document")
        return document

    async def load(self, document: dict[str, Any]) -> None:
        # from standard input: no password hash in the process list or in a file
        await self._run(
            "import_definitions", "--format", "json", "-q", stdin=json.dumps(document).encode()
        )

    async def delete_users(self, names: list[str]) -> None:
        if not names:
            return
        # one call for all of them (each rabbitmqctl call starts an Erlang VM); a missing user
        # is skipped (delete_user returns an error tuple, not an exception)
        binaries = ", ".join("<<" + json.dumps(name) + "/utf8>>" for name in names)
        delete = 'rabbit_auth_backend_internal:delete_user(U, <<"eventctl">>)'
        await self._run("eval", f"[{delete} || U <- [{binaries}]].")


class ManagementDefinitions:
    """The management plugin's ``/api/definitions`` (the user needs the administrator tag)."""

    def __init__(self, url: str, *, credentials_from: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise AdminError(f"management API URL must be http(s), not {parts.scheme or '?'}:")
        source = parts if parts.username else urlsplit(credentials_from or "")
        user, password = unquote(source.username or "guest"), unquote(source.password or "guest")
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        self._base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def _call(self, method: str, body: bytes | None, path: str = "/api/definitions") -> Any:
        # http(s) only (checked above): no file: or custom schemes
        request = urllib.request.Request(  # noqa: S310
            self._base + path, data=body, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(request, timeout=COMMAND_TIMEOUT) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise AdminError(f"management API {method}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminError(f"management API {method}: {exc}") from None
        try:
            return json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError as exc:
            raise AdminError(f"management API {method}: not JSON: {exc}") from None

    async def export(self) -> dict[str, Any]:
        document = await asyncio.to_thread(self._call, "GET", None)
        if not isinstance(document, dict):
            raise AdminError("management API: /api/definitions is not a definitions document")
        return document

    async def load(self, document: dict[str, Any]) -> None:
        await asyncio.to_thread(self._call, "POST", json.dumps(document).encode())

    async def delete_users(self, names: list[str]) -> None:
        if names:  # users that do not exist are skipped by the API
            body = json.dumps({"users": names}).encode()
            await asyncio.to_thread(self._call, "POST", body, "/api/users/bulk-delete")


def _tags(value: object) -> tuple[str, ...]:
    """Tags as a list (3.9+) or comma-separated text (older exports)."""
    if isinstance(value, str):
        return tuple(sorted(t.strip() for t in value.split(",") if t.strip()))
    if isinstance(value, list):
        return tuple(sorted(str(t) for t in value))
    return ()


def _rows(document: Mapping[str, Any], section: str) -> list[dict[str, Any]]:
    """The objects of one section of a definitions document (anything else is ignored)."""
    rows = document.get(section)
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _user_entry(user: BrokerUser, password: str) -> dict[str, Any]:
    return {
        "name": user.name,
        "password_hash": password_hash(password, os.urandom(4)),
        "hashing_algorithm": HASHING,
        "tags": sorted(user.tags),
        "limits": {},
    }


def differences(
    plan: AccessPlan, secrets: Mapping[str, str], current: Mapping[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """What to change (one line each) and the partial definitions document that changes it."""
    vhost = plan.vhost
    changes: list[str] = []
    patch: dict[str, list[dict[str, Any]]] = {
        "users": [],
        "vhosts": [],
        "permissions": [],
        "topic_permissions": [],
    }
    if vhost not in {v.get("name") for v in _rows(current, "vhosts")}:
        patch["vhosts"].append({"name": vhost})
        changes.append(f"vhost {vhost}: created")
    users = {u.get("name"): u for u in _rows(current, "users")}
    granted = {
        p.get("user"): (p.get("configure"), p.get("write"), p.get("read"))
        for p in _rows(current, "permissions")
        if p.get("vhost") == vhost
    }
    topics = {
        (t.get("user"), t.get("exchange")): (t.get("write"), t.get("read"))
        for t in _rows(current, "topic_permissions")
        if t.get("vhost") == vhost
    }
    for user in plan.users:
        password = secrets[user.name]
        existing = users.get(user.name)
        tags = tuple(sorted(user.tags))
        if existing is None:
            changes.append(f"user {user.name}: created, tags [{', '.join(tags)}]")
            patch["users"].append(_user_entry(user, password))
        else:
            what = []
            if existing.get("hashing_algorithm") != HASHING or not hash_matches(
                password, str(existing.get("password_hash") or "")
            ):
                what.append("password changed")
            if _tags(existing.get("tags")) != tags:
                what.append(f"tags set to [{', '.join(tags)}]")
            if what:
                changes.append(f"user {user.name}: {', '.join(what)}")
                patch["users"].append(_user_entry(user, password))
        p = user.permissions
        if granted.get(user.name) != (p.configure, p.write, p.read):
            changes.append(
                f"user {user.name}: permissions on {vhost}: "
                f"configure {p.configure!r} write {p.write!r} read {p.read!r}"
            )
            patch["permissions"].append(
                {
                    "user": user.name,
                    "vhost": vhost,
                    "configure": p.configure,
                    "write": p.write,
                    "read": p.read,
                }
            )
        t = user.topic
        if t is not None and topics.get((user.name, t.exchange)) != (t.write, t.read):
            changes.append(
                f"user {user.name}: topic permissions on {vhost} exchange {t.exchange}: "
                f"write {t.write!r} read {t.read!r}"
            )
            patch["topic_permissions"].append(
                {
                    "user": user.name,
                    "vhost": vhost,
                    "exchange": t.exchange,
                    "write": t.write,
                    "read": t.read,
                }
            )
    return changes, {key: rows for key, rows in patch.items() if rows}


async def provision(
    plan: AccessPlan,
    secrets: Mapping[str, str],
    backend: DefinitionsBackend,
    *,
    timeout: float = APPLY_TIMEOUT,
) -> list[str]:
    """Make the broker match ``plan``; the changes made, one line each (empty: nothing to do).

    Waits until the broker's definitions show every change (an import may finish after the
    command that started it returns); :class:`AdminError` if they do not within ``timeout``.
    """
    changes, patch = differences(plan, secrets, await backend.export())
    if not patch:
        return []
    await backend.load(patch)
    deadline = time.monotonic() + timeout
    while True:
        left, _ = differences(plan, secrets, await backend.export())
        if not left:
            return changes
        if time.monotonic() >= deadline:
            raise AdminError(f"the broker did not apply: {'; '.join(left)[:500]}")
        await asyncio.sleep(0.2)
