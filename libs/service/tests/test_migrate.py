"""``python -m tributary.service.migrate``: the release's Job upgrades, replicas wait for it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tributary.service import migrate
from tributary.testkit.infra import Found, create_postgres_database, drop_postgres_database


@pytest.fixture
def onboarding_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'onboarding.db'}"
    monkeypatch.setenv("ONBOARDING_DATABASE_URL", url)
    return url


async def test_wait_fails_before_the_upgrade_and_passes_after(onboarding_db: str) -> None:
    with pytest.raises(migrate.MigrateError, match="not at"):
        await migrate.run("onboarding", wait=0)

    await migrate.run("onboarding", wait=None)

    location = migrate.migrations_dir("onboarding")
    assert await migrate.current(onboarding_db) == migrate.heads(location, onboarding_db)
    await migrate.run("onboarding", wait=0)
    # a second upgrade (the next release's Job with nothing new) changes nothing
    await migrate.run("onboarding", wait=None)
    await migrate.run("onboarding", wait=0)


def test_every_service_has_its_migrations() -> None:
    for service in ("identity", "onboarding", "email", "audit", "notification", "billing"):
        assert (migrate.migrations_dir(service) / "env.py").is_file()
    assert migrate.migrations_dir("payment-provider").name == "migrations"


def test_main_exit_code_names_an_unknown_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate.main(["no-such-service"]) == 1
    assert "no service 'no-such-service'" in capsys.readouterr().err


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True))
def test_a_name_is_a_service_or_a_clear_error(name: str) -> None:
    known = {"identity", "onboarding", "email", "audit", "notification", "billing"}
    if name in known or name == "payment-provider":
        return
    with pytest.raises(migrate.MigrateError):
        migrate.service_settings(name)


@pytest.mark.parametrize("library", ["service", "messaging", "eventctl"])
def test_a_library_is_not_a_service(library: str) -> None:
    with pytest.raises(migrate.MigrateError, match=r"not a service|no service"):
        migrate.service_settings(library)


async def test_on_postgresql_a_database_not_created_yet_is_waited_for(
    postgres: Found, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first release: the operator has not created the database when replicas start."""
    name = f"t_migrate_{uuid.uuid4().hex[:12]}"
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("ONBOARDING_DATABASE_URL", url)
    with pytest.raises(migrate.MigrateError, match="unreachable"):
        await migrate.run("onboarding", wait=0)
    await create_postgres_database(postgres.url, name)
    try:
        with pytest.raises(migrate.MigrateError, match="it is at none"):
            await migrate.run("onboarding", wait=0)
        await migrate.run("onboarding", wait=None)
        await migrate.run("onboarding", wait=0)
    finally:
        await drop_postgres_database(postgres.url, name)
