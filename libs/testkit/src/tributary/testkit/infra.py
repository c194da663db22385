"""Find a RabbitMQ and a PostgreSQL for tests: given, local, started locally, or a container.

Order for the broker: ``RABBITMQ_URL``; a broker on 127.0.0.1:5672; a locally installed
``rabbitmq-server`` started here; testcontainers; else :class:`InfraUnavailable` with what to
install. PostgreSQL: ``TEST_POSTGRES_URL``; a server on 127.0.0.1:5432; testcontainers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"


class InfraUnavailable(RuntimeError):
    """No server of the needed kind could be found or started."""


@dataclass(frozen=True)
class Found:
    url: str
    how: str  # "env", "local", "started", "container"
    controllable: bool  # may tests stop/start it (rabbitmqctl)?


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _wait_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.5)
    return False


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


def _is_local(host: str) -> bool:
    return host in {"127.0.0.1", "localhost", "::1"}


def find_rabbitmq(stack: ExitStack) -> Found:
    """A reachable RabbitMQ; containers started here are stopped when ``stack`` closes."""
    local_ctl = shutil.which("rabbitmqctl") is not None
    if url := os.environ.get("RABBITMQ_URL"):
        host, port = _host_port(url, 5672)
        if not _wait_port(host, port, 10):
            raise InfraUnavailable(f"RABBITMQ_URL={url} is set but nothing answers on {port}")
        return Found(url, "env", local_ctl and _is_local(host))
    if port_open("127.0.0.1", 5672):
        return Found(DEFAULT_RABBITMQ_URL, "local", local_ctl)
    if server := shutil.which("rabbitmq-server"):
        subprocess.run([server, "-detached"], check=False, capture_output=True)
        if _wait_port("127.0.0.1", 5672, 60):
            return Found(DEFAULT_RABBITMQ_URL, "started", local_ctl)
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        container: Any = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management"))
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        return Found(f"amqp://guest:guest@{host}:{port}/", "container", False)
    raise InfraUnavailable(
        "no RabbitMQ: set RABBITMQ_URL, or install RabbitMQ (apt-get install rabbitmq-server) "
        "or Docker (for testcontainers)"
    )


def find_postgres(stack: ExitStack) -> Found:
    """A reachable PostgreSQL (SQLAlchemy asyncpg URL of a database we may create others in)."""
    if url := os.environ.get("TEST_POSTGRES_URL"):
        return Found(url, "env", False)
    if port_open("127.0.0.1", 5432):
        return Found(DEFAULT_POSTGRES_URL, "local", False)
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        container: Any = stack.enter_context(PostgresContainer("postgres:16", driver="asyncpg"))
        return Found(container.get_connection_url(), "container", False)
    raise InfraUnavailable(
        "no PostgreSQL: set TEST_POSTGRES_URL, or install PostgreSQL "
        "(apt-get install postgresql) or Docker (for testcontainers)"
    )


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_postgres_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; returns its SQLAlchemy URL."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


async def drop_postgres_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database(
    request: Any, kind: str, directory: Path, label: str = "test"
) -> AsyncIterator[str]:
    """A fresh, empty database for one test: an SQLite file ``<label>.db`` in ``directory``, or
    a new PostgreSQL database on the session's server (the ``postgres`` fixture, asked of
    ``request``), dropped afterwards. ``kind`` is ``sqlite`` or ``postgres``/``postgresql``."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / (label + '.db')}"
        return
    server: Found = request.getfixturevalue("postgres")
    name = f"t_{label.replace('-', '_')}_{uuid.uuid4().hex[:12]}"
    url = await create_postgres_database(server.url, name)
    try:
        yield url
    finally:
        await drop_postgres_database(server.url, name)
