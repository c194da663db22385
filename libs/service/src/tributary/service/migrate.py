"""``python -m tributary.service.migrate SERVICE``: a service's migrations, apart from serving.

Services upgrade their own database at start-up, which is enough for one process. With
several replicas (Kubernetes) the upgrade runs once per release as a Job, and every replica
waits in an init container (``--wait``) until the database is at the revision its image
carries, so no two upgrades race and no replica serves an older schema than its code.

SERVICE is the service's name (``identity``, ``payment-provider``): its settings
(``<MODULE>_DATABASE_URL``, ``<MODULE>_MIGRATION_DATABASE_URL``) and its ``migrations``
directory come from ``tributary.<module>``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from tributary.messaging.db import create_engine
from tributary.service.migrations import alembic_config, upgrade
from tributary.service.settings import ServiceSettings

POLL_SECONDS = 2.0


class MigrateError(RuntimeError):
    """Unknown service, or the database did not reach the head in time."""


def module_name(service: str) -> str:
    """``payment_provider`` for ``payment-provider``."""
    return service.replace("-", "_")


def service_settings(service: str) -> ServiceSettings:
    try:
        module = importlib.import_module(f"tributary.{module_name(service)}.settings")
    except ModuleNotFoundError as exc:
        raise MigrateError(f"no service {service!r} in this image: {exc}") from None
    factory = getattr(module, "Settings", None)
    if not (isinstance(factory, type) and issubclass(factory, ServiceSettings)):
        raise MigrateError(f"{service!r} is not a service (no service Settings)")
    settings: ServiceSettings = factory()  # type: ignore[call-arg]  # its fields: env vars
    return settings


def migrations_dir(service: str) -> Path:
    package = importlib.import_module(f"tributary.{module_name(service)}")
    path = Path(package.__file__ or "").parent / "migrations"
    if not path.is_dir():
        raise MigrateError(f"{service} has no migrations directory")
    return path


def owner_url(settings: ServiceSettings) -> str:
    """The URL migrations run with: the tables' owner when the service has one."""
    return settings.migration_database_url or settings.database_url


def heads(script_location: Path, url: str) -> set[str]:
    """The head revisions of the migrations the image carries."""
    return set(ScriptDirectory.from_config(alembic_config(script_location, url)).get_heads())


async def current(url: str) -> set[str]:
    """The revisions the database is at (empty before the first migration)."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:

            def read(conn: Connection) -> set[str]:
                return set(MigrationContext.configure(conn).get_current_heads())

            return await connection.run_sync(read)
    finally:
        await engine.dispose()


async def wait_for_head(script_location: Path, url: str, *, timeout: float) -> None:
    """Return once the database is at the head revision; :class:`MigrateError` after
    ``timeout`` seconds. An unreachable database counts as not there yet."""
    wanted = heads(script_location, url)
    deadline = time.monotonic() + timeout
    seen: set[str] | str = set()
    while True:
        try:
            seen = await current(url)
        except (OSError, DBAPIError) as exc:  # not up yet, or its database not created yet
            seen = f"unreachable ({exc})"
        if seen == wanted:
            return
        if time.monotonic() >= deadline:
            raise MigrateError(
                f"database not at {sorted(wanted)} after {timeout:g} s (it is at {seen or 'none'})"
            )
        await asyncio.sleep(POLL_SECONDS)


async def run(service: str, *, wait: float | None) -> None:
    settings = service_settings(service)
    location = migrations_dir(service)
    if wait is None:
        await upgrade(location, owner_url(settings))
    else:
        await wait_for_head(location, owner_url(settings), timeout=wait)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tributary.service.migrate",
        description="Upgrade a service's database to the head revision, or wait until it is.",
    )
    parser.add_argument("service", help="identity, onboarding, ..., payment-provider")
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="do not migrate: wait until the database is at the head revision (init container)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.service, wait=args.wait))
    except MigrateError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    print(f"migrate: {args.service} at head")
    return 0


if __name__ == "__main__":
    sys.exit(main())
