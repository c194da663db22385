"""Crypto-shredding: personal data in stored events is encrypted with a key per user.

The event store is append-only, so erasure cannot delete or rewrite an event. Instead every
personal value written into an event is encrypted (AES-256-GCM) with the user's data key,
kept in ``data_keys``; erasing the user deletes the key, and every value sealed with it is
unreadable for good, in the store and in any copy of it. The associated data binds a
ciphertext to its stream and field, so it cannot be moved into another event.

The keys sit in billing's own database: a backup still holds a key until the backup ages
out (as for every other table). Wrapping the keys with a key from a KMS would end that too.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.billing.events import Sealed
from tributary.billing.models import DataKey

log = logging.getLogger("tributary.billing.crypto")

NONCE_BYTES = 12


def aad(stream_id: str, field: str) -> bytes:
    return f"{stream_id}/{field}".encode()


def seal(key: DataKey, value: str, associated: bytes) -> Sealed:
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key.key).encrypt(nonce, value.encode(), associated)
    return Sealed(key_id=key.key_id, ciphertext=base64.b64encode(nonce + ciphertext).decode())


def unseal(key: DataKey, sealed: Sealed, associated: bytes) -> str | None:
    """The value, or None if it does not decrypt (tampered, or moved from elsewhere)."""
    try:
        raw = base64.b64decode(sealed.ciphertext, validate=True)
        plain = AESGCM(key.key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        log.warning("a sealed value under key %s does not decrypt", sealed.key_id)
        return None
    return plain.decode()


async def ensure_key(sessions: async_sessionmaker[AsyncSession], user_id: str) -> DataKey:
    """The user's data key, made (and committed, on its own) if they have none yet."""
    async with sessions() as session:
        found = await key_of_user(session, user_id)
        if found is not None:
            return found
        key = DataKey(
            key_id=f"dk_{secrets.token_hex(12)}",
            user_id=user_id,
            key=AESGCM.generate_key(bit_length=256),
        )
        session.add(key)
        try:
            await session.commit()
        except IntegrityError:  # made by a request running alongside
            await session.rollback()
            made = await key_of_user(session, user_id)
            if made is None:
                raise
            return made
        return key


async def key_of_user(session: AsyncSession, user_id: str) -> DataKey | None:
    rows = await session.exec(select(DataKey).where(col(DataKey.user_id) == user_id))
    return rows.first()


async def open_sealed(session: AsyncSession, sealed: Sealed, associated: bytes) -> str | None:
    """The value, or None once its key is gone (the user was erased)."""
    key = await session.get(DataKey, sealed.key_id)
    return None if key is None else unseal(key, sealed, associated)


async def shred(session: AsyncSession, user_id: str) -> int:
    """Delete the user's data key (in the session's transaction): their sealed values are
    unreadable from the commit on. How many keys went (0 or 1)."""
    result = await session.exec(delete(DataKey).where(col(DataKey.user_id) == user_id))
    return int(result.rowcount or 0)
