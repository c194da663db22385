"""The bootstrap admin: an owner account and its API key, registered from the environment.

With ``BOOTSTRAP_ADMIN_API_KEY`` set, identity makes sure at start-up that the built-in user
``usr_bootstrapadmin`` (role ``owner``) exists and that its API key ``key_bootstrap`` has that
secret: the first credential of a fresh installation, from which every other is issued.

Idempotent, and safe when two replicas start at once (inserts that ignore a concurrent twin).
A changed secret replaces the stored hash (rotation) and re-enables a revoked bootstrap key; the
same secret leaves a revoked key revoked. The user is configuration rather than a sign-up:
no ``user.created`` event announces it (no welcome email to an address that cannot receive one).
"""

from __future__ import annotations

import logging

from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.identity.inserts import insert_or_ignore
from tributary.identity.models import ApiKey, User, hash_secret, normalize_email
from tributary.messaging.db import now

log = logging.getLogger("tributary.identity.bootstrap")

ADMIN_USER_ID = "usr_bootstrapadmin"
BOOTSTRAP_KEY_ID = "key_bootstrap"
"""Both shaped like the ids events carry (``usr_``/``key_`` and 8 to 40 letters or digits)."""
ADMIN_EMAIL = "admin@tributary.invalid"
"""RFC 2606 ``.invalid``: a placeholder that can never be delivered to."""


async def register_bootstrap_admin(sessions: async_sessionmaker[AsyncSession], secret: str) -> None:
    stamp = now()
    secret_hash = hash_secret(secret)
    async with sessions() as session:
        await insert_or_ignore(
            session,
            User,
            id=ADMIN_USER_ID,
            email=ADMIN_EMAIL,
            email_normalized=normalize_email(ADMIN_EMAIL),
            name="Bootstrap admin",
            plan="free",
            locale="en-GB",
            role="owner",
            created_at=stamp,
            updated_at=stamp,
        )
        if await session.get(User, ADMIN_USER_ID) is None:
            raise RuntimeError(
                f"the bootstrap admin {ADMIN_USER_ID} cannot be created: another user "
                f"has registered its placeholder address"
            )
        await insert_or_ignore(
            session,
            ApiKey,
            id=BOOTSTRAP_KEY_ID,
            user_id=ADMIN_USER_ID,
            name="bootstrap",
            prefix=secret[:9],
            secret_hash=secret_hash,
            created_at=stamp,
            revoked_at=None,
        )
        rotated = await session.exec(
            update(ApiKey)
            .where(col(ApiKey.id) == BOOTSTRAP_KEY_ID, col(ApiKey.secret_hash) != secret_hash)
            .values(secret_hash=secret_hash, prefix=secret[:9], revoked_at=None)
        )
        key = await session.get(ApiKey, BOOTSTRAP_KEY_ID)
        await session.commit()
    if key is None or key.user_id != ADMIN_USER_ID:
        raise RuntimeError(f"the bootstrap API key {BOOTSTRAP_KEY_ID} could not be registered")
    if rotated.rowcount:
        log.info("bootstrap API key %s: secret replaced", BOOTSTRAP_KEY_ID)
    elif key.revoked_at is not None:
        log.warning(
            "bootstrap API key %s is revoked; set a new BOOTSTRAP_ADMIN_API_KEY to re-enable it",
            BOOTSTRAP_KEY_ID,
        )
    else:
        log.info("bootstrap API key %s registered for %s", BOOTSTRAP_KEY_ID, ADMIN_USER_ID)
