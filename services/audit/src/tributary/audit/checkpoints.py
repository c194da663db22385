"""Signed checkpoints: every so many entries (or seconds) the head of the chain is signed.

The signature (Ed25519) covers ``{seq, head, signed_at}`` (see
:mod:`tributary.contracts.audit_chain`). The checkpoint is kept in ``audit_checkpoints`` and
published as ``audit.checkpoint.v1`` through the outbox in the same transaction, so copies
live outside the database: whoever holds one can prove later that the log still reaches
that head, i.e. was neither cut short nor rewritten before it. The private key is never
stored in the audit database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.audit.chain import head
from tributary.audit.models import AuditCheckpoint
from tributary.audit.settings import Settings
from tributary.contracts.audit_chain import b64, checkpoint_message, key_id
from tributary.contracts.events import AuditCheckpointV1
from tributary.messaging.db import now
from tributary.messaging.uow import UnitOfWork

log = logging.getLogger("tributary.audit")


class SigningKeyError(ValueError):
    """``AUDIT_SIGNING_KEY`` (or the key file) does not hold an Ed25519 private key."""


def _parse_key(text: str) -> Ed25519PrivateKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_")
            key = Ed25519PrivateKey.from_private_bytes(raw)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SigningKeyError("not an Ed25519 private key (PEM or base64 raw)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError("not an Ed25519 private key")
    return key


def load_signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The key from ``AUDIT_SIGNING_KEY``; else from (or newly into) ``AUDIT_SIGNING_KEY_FILE``."""
    if settings.signing_key is not None and settings.signing_key.get_secret_value():
        return _parse_key(settings.signing_key.get_secret_value())
    path = Path(settings.signing_key_file)
    try:
        return _parse_key(path.read_text())
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another replica made it first
        return _parse_key(path.read_text())
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    log.warning(
        "AUDIT_SIGNING_KEY is not set: generated a checkpoint signing key into %s; "
        "keep it (checkpoints signed with a lost key can no longer be told from forgeries)",
        path,
    )
    return key


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key(self) -> str:
        return b64(self.public_raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, seq: int, head: str, signed_at: datetime) -> str:
        return b64(self.key.sign(checkpoint_message(seq, head, signed_at)))


async def last_checkpoint_seq(session: AsyncSession) -> int:
    return (await head(session)).checkpointed


async def checkpoint(uow: UnitOfWork, signer: Signer) -> AuditCheckpoint | None:
    """Sign the head if entries were appended since the last checkpoint (not committed)."""
    session = uow.session
    last = await head(session)
    if last.seq <= last.checkpointed:
        return None
    seq, head_hash = last.seq, last.hash
    signed_at = now()
    row = AuditCheckpoint(
        seq=seq,
        head=head_hash,
        signed_at=signed_at,
        key_id=signer.key_id,
        public_key=signer.public_key,
        signature=signer.sign(seq, head_hash, signed_at),
    )
    session.add(row)
    uow.outbox.add(
        AuditCheckpointV1(
            seq=seq,
            head=head_hash,
            signed_at=signed_at,
            key_id=row.key_id,
            public_key=row.public_key,
            signature=row.signature,
        ),
        subject=f"audit/checkpoints/{seq}",
    )
    await session.flush()
    last.checkpointed = seq
    return row


async def checkpoint_periodically(
    make_uow: Callable[[], UnitOfWork | None], signer: Signer, seconds: float
) -> None:
    """Every ``seconds``, sign the head if it moved (runs until cancelled)."""
    while True:
        await asyncio.sleep(seconds)
        uow = make_uow()
        if uow is None:
            continue
        try:
            async with uow:
                if await checkpoint(uow, signer) is not None:
                    await uow.commit()
        except IntegrityError:  # another replica signed the same head first
            continue
        except Exception as exc:  # the database is down: try again next time
            log.warning("periodic checkpoint failed: %s", type(exc).__name__)
