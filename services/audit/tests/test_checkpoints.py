"""Signed checkpoints and what verification against them detects (SQLite, no broker).

The tampering below runs as someone who owns the database would: the fake unit of work's
tables have no append-only triggers, as if a superuser had dropped them.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import text
from sqlmodel import col, select

from tributary.audit import chain
from tributary.audit.checkpoints import Signer, SigningKeyError, checkpoint, load_signing_key
from tributary.audit.handlers import Checkpointing, record_event
from tributary.audit.models import AuditCheckpoint, AuditEntry, CheckpointRef
from tributary.audit.settings import Settings
from tributary.contracts.audit_chain import checkpoint_message, unb64
from tributary.contracts.events import AuditCheckpointV1
from tributary.service.testing import FakeUnitOfWork, fake_uow

from .test_chain import an_entry
from .test_handlers import user_created

SIGNER = Signer(Ed25519PrivateKey.generate())


async def signed_chain(uow: FakeUnitOfWork, n: int, every: int) -> list[AuditEntry]:
    """``n`` entries with a checkpoint after every ``every`` of them and one at the end."""
    for i in range(1, n + 1):
        await chain.append(uow.session, an_entry(i))
        if i % every == 0 or i == n:
            await checkpoint(uow, SIGNER)  # type: ignore[arg-type]
    return await entries(uow)


async def entries(uow: FakeUnitOfWork) -> list[AuditEntry]:
    query = select(AuditEntry).order_by(col(AuditEntry.seq))
    return list((await uow.session.exec(query)).all())


async def rehash_from(uow: FakeUnitOfWork, seq: int) -> None:
    """Recompute every hash from ``seq`` on, as a forger covering a rewrite would."""
    rows = await entries(uow)
    prev = rows[seq - 2].hash if seq > 1 else chain.GENESIS
    for row in rows[seq - 1 :]:
        row.prev_hash = prev
        row.hash = chain.entry_hash(row, prev)
        prev = row.hash
    await uow.session.flush()


async def sql(uow: FakeUnitOfWork, statement: str) -> None:
    connection = await uow.session.connection()
    await connection.execute(text(statement))


async def verify(uow: FakeUnitOfWork, **kwargs: Any) -> Any:
    return await chain.verify(uow.session, public_key=SIGNER.public_key, **kwargs)


async def test_checkpoints_sign_the_head_every_n_entries_and_are_published(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        settings = Checkpointing(SIGNER, every=3)
        for _ in range(7):
            await record_event(user_created(), uow, checkpoints=settings)  # type: ignore[arg-type]
        rows = (await uow.session.exec(select(AuditCheckpoint))).all()
        assert [r.seq for r in rows] == [3, 6]
        published = [p for p, _ in uow.outbox.events if isinstance(p, AuditCheckpointV1)]
        assert [(p.seq, p.head) for p in published] == [(r.seq, r.head) for r in rows]
        chained = await entries(uow)
        assert published[1].head == chained[5].hash
        # anyone with the public key verifies a published checkpoint
        event = published[1]
        assert event.public_key == SIGNER.public_key
        assert event.key_id == SIGNER.key_id
        key = Ed25519PublicKey.from_public_bytes(unb64(event.public_key))
        key.verify(unb64(event.signature), checkpoint_message(6, event.head, event.signed_at))
        assert chain.signature_holds(
            event.public_key, 6, event.head, event.signed_at, event.signature
        )
        assert not chain.signature_holds(
            event.public_key, 5, event.head, event.signed_at, event.signature
        )
        # nothing new since the last one: no checkpoint
        assert await checkpoint(uow, SIGNER) is not None  # type: ignore[arg-type]
        assert await checkpoint(uow, SIGNER) is None  # type: ignore[arg-type]
        result = await verify(uow)
        assert result.ok
        assert result.checkpoint == CheckpointRef(seq=7, head=chained[6].hash)


async def test_deleting_the_newest_entries_is_detected_as_truncation(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await signed_chain(uow, 7, every=3)
        await sql(uow, "DELETE FROM audit_entries WHERE seq >= 6")
        result = await verify(uow)
        assert (result.ok, result.broken_at, result.entries) == (False, 6, 5)
        assert result.reason == (
            "entries 6 to 7 are missing: checkpoint 7 signed a longer chain (the log was cut short)"
        )
        assert result.checkpoint == CheckpointRef(seq=3, head=(await entries(uow))[2].hash)
        # the links alone do not show it
        assert (await chain.verify(uow.session)).ok


async def test_a_rewritten_middle_entry_with_every_later_hash_recomputed_is_detected(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        rows = await signed_chain(uow, 6, every=1)
        rows[2].data = {**rows[2].data, "new_role": "owner"}
        await rehash_from(uow, 3)
        assert (await chain.verify(uow.session)).ok  # the links hold
        result = await verify(uow)
        assert (result.ok, result.broken_at, result.entries) == (False, 3, 2)
        assert "does not reach the head checkpoint 3 signed" in (result.reason or "")


async def test_with_sparse_checkpoints_a_rewrite_is_placed_after_the_last_good_one(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        rows = await signed_chain(uow, 8, every=3)
        rows[4].subject = "users/usr_forged0000"
        await rehash_from(uow, 5)
        result = await verify(uow)
        assert (result.ok, result.broken_at, result.entries) == (False, 4, 3)
        assert result.reason == (
            "the chain does not reach the head checkpoint 6 signed: an entry from 4 to 6 "
            "was rewritten, reordered or replaced"
        )


async def test_reordered_entries_are_detected(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        rows = await signed_chain(uow, 6, every=1)
        fourth, fifth = rows[3], rows[4]
        swapped = ("event_id", "subject", "data", "event_time", "recorded_at")
        values = {name: getattr(fourth, name) for name in swapped}
        for name in swapped:
            setattr(fourth, name, getattr(fifth, name))
            setattr(fifth, name, values[name])
        await rehash_from(uow, 4)
        result = await verify(uow)
        assert (result.ok, result.broken_at) == (False, 4)
        # without recomputing, the links break at the first moved entry
        await sql(uow, "UPDATE audit_entries SET hash = 'x' || hash WHERE seq = 4")
        assert (await verify(uow)).broken_at == 4


async def test_a_changed_entry_is_detected_at_its_seq(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await signed_chain(uow, 5, every=2)
        await sql(uow, """UPDATE audit_entries SET data = '{"new_role": "owner"}' WHERE seq = 3""")
        result = await verify(uow)
        assert (result.ok, result.broken_at, result.entries) == (False, 3, 2)
        assert result.reason == "the entry's content does not match its hash"


async def test_a_forged_checkpoint_row_is_detected(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await signed_chain(uow, 4, every=2)
        await sql(
            uow,
            "UPDATE audit_checkpoints SET head = "
            "(SELECT hash FROM audit_entries WHERE seq = 3) WHERE seq = 4",
        )
        result = await verify(uow)
        assert (result.ok, result.broken_at) == (False, 4)
        assert result.reason == "checkpoint 4's signature does not hold: it was forged"


async def test_verification_resumes_from_a_known_checkpoint_and_remembers_it_when_rows_go(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        rows = await signed_chain(uow, 6, every=3)
        first = await verify(uow)
        assert first.ok
        assert first.entries == 6
        known = first.checkpoint
        assert known == CheckpointRef(seq=6, head=rows[5].hash)
        for i in range(7, 9):
            await chain.append(uow.session, an_entry(i))
        again = await verify(uow, known=known)
        assert (again.ok, again.entries, again.checkpoint) == (True, 8, known)
        # entries and checkpoints after 3 deleted: the remembered checkpoint still counts
        await sql(uow, "DELETE FROM audit_entries WHERE seq > 3")
        await sql(uow, "DELETE FROM audit_checkpoints WHERE seq > 3")
        cut = await verify(uow, known=known)
        assert (cut.ok, cut.broken_at) == (False, 4)
        assert (await verify(uow)).ok  # without it, nothing shows


async def test_a_rewrite_before_the_known_checkpoint_is_found_by_an_incremental_verify(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        rows = await signed_chain(uow, 4, every=1)
        known = (await verify(uow)).checkpoint
        rows[1].data = {}
        await rehash_from(uow, 2)
        result = await verify(uow, known=known)
        assert (result.ok, result.broken_at) == (False, 2)
        assert (await verify(uow, known=known, full=True)).broken_at == 2


def test_without_a_key_setting_one_is_generated_into_a_private_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys" / "audit-signing-key"
    settings = Settings.model_validate({"AUDIT_SIGNING_KEY_FILE": str(path)})
    with caplog.at_level(logging.WARNING, "tributary.audit"):
        key = load_signing_key(settings)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "AUDIT_SIGNING_KEY is not set" in caplog.text
    assert "PRIVATE" not in caplog.text
    again = load_signing_key(settings)
    assert Signer(again).public_key == Signer(key).public_key


def test_a_pem_key_setting_is_used_and_a_bad_one_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    unused = tmp_path / "unused"
    settings = Settings.model_validate(
        {"AUDIT_SIGNING_KEY": pem, "AUDIT_SIGNING_KEY_FILE": str(unused)}
    )
    assert Signer(load_signing_key(settings)).public_key == Signer(key).public_key
    assert not unused.exists()
    for bad in ("not a key", "c2hvcnQ="):
        with pytest.raises(SigningKeyError):
            load_signing_key(Settings.model_validate({"AUDIT_SIGNING_KEY": bad}))
