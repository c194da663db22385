"""SQLite commits are on disk before the consumer acks: FULL sync unless told otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from tributary.messaging.db import (
    SQLITE_SYNCHRONOUS_ENV,
    SQLITE_SYNCHRONOUS_LEVELS,
    create_engine,
    sqlite_synchronous,
)

# PRAGMA synchronous reads back as a number
LEVEL_NUMBERS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


async def pragmas(path: Path) -> tuple[str, int]:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            synchronous = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
    finally:
        await engine.dispose()
    return str(journal), int(synchronous)


async def test_an_engine_syncs_every_commit_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SQLITE_SYNCHRONOUS_ENV, raising=False)
    assert await pragmas(tmp_path / "default.db") == ("wal", LEVEL_NUMBERS["FULL"])


async def test_the_environment_chooses_another_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SQLITE_SYNCHRONOUS_ENV, "normal")
    assert await pragmas(tmp_path / "normal.db") == ("wal", LEVEL_NUMBERS["NORMAL"])


def test_an_unknown_level_fails_at_engine_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SQLITE_SYNCHRONOUS_ENV, "FULL; DROP TABLE x")
    with pytest.raises(ValueError, match=SQLITE_SYNCHRONOUS_ENV):
        create_engine("sqlite+aiosqlite:///:memory:")


@given(st.text(max_size=20))
def test_any_setting_is_a_known_level_or_refused(value: str) -> None:
    try:
        chosen = sqlite_synchronous(value)
    except ValueError:
        assert value.strip().upper() not in SQLITE_SYNCHRONOUS_LEVELS
    else:
        assert chosen in SQLITE_SYNCHRONOUS_LEVELS
        assert chosen == (value.strip().upper() or sqlite_synchronous())
