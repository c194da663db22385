"""Erasure of a user (GDPR Art. 17): ``DELETE /users/{user_id}`` and identity's ``user.erased``.

The request deletes, in one transaction, everything identity's database holds about the user:
the user row, their API keys (so no token can be obtained with them again; tokens already
issued expire within their lifetime), their sign-up idempotency keys and their subscriptions;
it purges identity's outbox rows that mention them and adds ``user.erased``, which tells every
other service to do the same. Identity consumes its own ``user.erased`` too: through the
at-least-once path it sweeps identity's dead-letter queue (a failed ``payment.succeeded`` about
the user), retried until it succeeds.

Nothing is kept about whom was erased, so a second erasure answers 404, like an id that never
existed.
"""

from __future__ import annotations

import logging
import re

from fastapi import APIRouter, Response
from sqlalchemy import delete
from sqlmodel import col

from tributary.contracts.envelope import Event
from tributary.contracts.events import UserErasedV1
from tributary.identity.api import UserIdPath
from tributary.identity.bootstrap import ADMIN_USER_ID
from tributary.identity.models import ApiKey, SignUpKey, Subscription, User
from tributary.identity.rates import WRITES
from tributary.messaging.bus import Handlers
from tributary.messaging.db import now
from tributary.messaging.uow import UnitOfWork
from tributary.service.app import UowDep
from tributary.service.auth import require
from tributary.service.problems import conflict, not_found, problem_responses

log = logging.getLogger("tributary.identity.erasure")
router = APIRouter(tags=["users"])

PERSON_ID = re.compile(r"usr_[A-Za-z0-9]{8,40}")
"""The ids identity gives people; built-in accounts (the bootstrap owner) have others."""


@router.delete(
    "/users/{user_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 409, 429),
    dependencies=[require("users:write", owner="user_id"), WRITES],
)
async def erase_user(uow: UowDep, user_id: UserIdPath) -> None:
    """Erase a user and everything identity holds about them (GDPR Art. 17).

    Your own account with `users:write`; anyone's with `users:admin` as well. Deletes the user,
    their API keys, sign-up idempotency keys and subscriptions, and identity's outbox events
    about them, then announces `user.erased.v1`: every service deletes what it holds about the
    user. Erasing again answers 404, as for a user that never existed; a built-in account
    (not a person's) is a 409.
    """
    user = await uow.session.get(User, user_id, with_for_update=True)
    if user is None:
        raise not_found(
            f"There is no user {user_id}.", field="path.user_id", message="no such user"
        )
    if user.id == ADMIN_USER_ID or not PERSON_ID.fullmatch(user.id):
        raise conflict(
            "A built-in account cannot be erased.",
            field="path.user_id",
            message="is a built-in account",
        )
    addresses = sorted({user.email, user.email_normalized})
    session = uow.session
    # the rows that refer to the user first (foreign keys)
    await session.exec(delete(SignUpKey).where(col(SignUpKey.user_id) == user_id))
    await session.exec(delete(ApiKey).where(col(ApiKey.user_id) == user_id))
    await session.exec(delete(Subscription).where(col(Subscription.user_id) == user_id))
    await session.exec(delete(User).where(col(User.id) == user_id))
    purged = await uow.purge_person_from_outbox(user_id, also=addresses)
    uow.outbox.add(
        UserErasedV1(user_id=user_id, erased_at=now()),
        subject=f"users/{user_id}",
        idempotency_key=f"user.erased:{user_id}",
    )
    await uow.commit()
    log.info("user %s erased (%d outbox rows purged)", user_id, purged)


async def on_user_erased(event: Event[UserErasedV1], uow: UnitOfWork) -> None:
    """Sweep identity's dead-letter queue (and purge its outbox again: a no-op by now)."""
    erased = await uow.erase_person(event.data.user_id)
    log.info(
        "user %s erased from identity's DLQ (%d dead letters) and outbox (%d rows)",
        event.data.user_id,
        erased.dead_letters.removed,
        erased.outbox,
    )


HANDLERS: Handlers = {UserErasedV1: on_user_erased}
