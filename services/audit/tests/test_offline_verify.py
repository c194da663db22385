"""``eventctl audit verify``: an audit database checked offline against captured checkpoints."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from sqlalchemy import text

from tributary.audit import chain
from tributary.contracts.envelope import new_event
from tributary.contracts.events import AuditCheckpointV1
from tributary.eventctl.cli import main_async
from tributary.messaging.db import create_engine
from tributary.service.testing import FakeUnitOfWork, fake_uow

from .test_chain import an_entry
from .test_checkpoints import SIGNER, signed_chain


def published(uow: FakeUnitOfWork) -> list[AuditCheckpointV1]:
    return [p for p, _ in uow.outbox.events if isinstance(p, AuditCheckpointV1)]


def capture(path: Path, checkpoints: list[AuditCheckpointV1], *, archived: bool = False) -> None:
    """JSON lines as a collector on the bus writes them (or as ``dlq archive`` records)."""
    lines = []
    for cp in checkpoints:
        body = new_event(routing_key=cp.routing_key, source="/services/audit", data=cp).to_bytes()
        if archived:
            lines.append(json.dumps({"queue": "x", "body_base64": base64.b64encode(body).decode()}))
        else:
            lines.append(body.decode())
    other = new_event(routing_key="user.erased.v1", source="/services/identity", data={})
    lines.insert(0, other.model_dump_json())  # other events are skipped
    path.write_text("\n".join(lines) + "\n")


async def run(*argv: str) -> int:
    return await main_async(["audit", "verify", *argv])


async def test_an_intact_chain_verifies_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    async with fake_uow(str(db)) as uow:
        await signed_chain(uow, 7, every=3)
    capture(tmp_path / "cps.jsonl", published(uow))
    capture(tmp_path / "archive.jsonl", published(uow), archived=True)
    url = f"sqlite+aiosqlite:///{db}"
    assert await run("--database", url, "--checkpoints", str(tmp_path / "cps.jsonl")) == 0
    assert "audit chain OK: 7 entries verified; last checkpoint 7" in capsys.readouterr().out
    key = ["--public-key", SIGNER.public_key]
    assert await run("--database", url, "--checkpoints", str(tmp_path / "archive.jsonl"), *key) == 0


async def test_a_cut_short_or_rewritten_chain_fails_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.db"
    async with fake_uow(str(db)) as uow:
        await signed_chain(uow, 6, every=2)
        await chain.append(uow.session, an_entry(7))
    cps = tmp_path / "cps.jsonl"
    capture(cps, published(uow))
    url = f"sqlite+aiosqlite:///{db}"
    args = ("--database", url, "--checkpoints", str(cps), "--public-key", SIGNER.public_key)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM audit_entries WHERE seq >= 5"))
    await engine.dispose()
    assert await run(*args) == 1
    assert "BROKEN at seq 5: entries 5 to 6 are missing" in capsys.readouterr().out

    async with fake_uow(str(db)) as uow:
        for i in (5, 6):
            await chain.append(uow.session, an_entry(i))  # re-appended, not the same entries
    assert await run(*args) == 1
    assert "BROKEN at seq 5: the chain does not reach the head checkpoint 6" in (
        capsys.readouterr().out
    )

    other_key = "A" * 43
    assert await run("--database", url, "--checkpoints", str(cps), "--public-key", other_key) == 1
    assert "signature does not hold" in capsys.readouterr().out


async def test_a_bad_checkpoints_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "com.tributary.audit.checkpoint.v1", "data": {"seq": 0}}\n')
    assert await run("--database", "sqlite+aiosqlite:///unused", "--checkpoints", str(bad)) == 2
    err = capsys.readouterr().err
    assert "line 1: not a valid audit.checkpoint.v1" in err
    assert "Traceback" not in err
