"""API keys: issued to a user, listed without their secrets, revoked."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import update
from sqlmodel import col, select

from tributary.contracts.events import ApiKeyRevokedV1
from tributary.identity.api import UserIdPath
from tributary.identity.errors import key_not_found, user_not_found
from tributary.identity.models import ApiKey, User
from tributary.identity.rates import WRITES
from tributary.identity.schemas import ApiKeyCreate, ApiKeyIssued, ApiKeyPublic
from tributary.messaging.db import now
from tributary.service.app import SessionDep, UowDep
from tributary.service.auth import Principal, require
from tributary.service.caching import no_store
from tributary.service.problems import problem_responses

log = logging.getLogger("tributary.identity.api_keys")
router = APIRouter(tags=["api keys"])

KeyIdPath = Annotated[str, Path(max_length=60, examples=["key_0123456789abcdef0123"])]


@router.post(
    "/users/{user_id}/api-keys",
    status_code=201,
    response_model=ApiKeyIssued,
    responses=problem_responses(404, 422, 429),
    dependencies=[require("keys:write", owner="user_id"), WRITES],
)
async def create_api_key(
    uow: UowDep, user_id: UserIdPath, response: Response, body: ApiKeyCreate | None = None
) -> ApiKeyIssued:
    """Issue an API key. The `secret` is in this answer only: just its hash is kept."""
    no_store(response)  # the answer carries a secret
    if await uow.session.get(User, user_id) is None:
        raise user_not_found(user_id)
    key, secret = ApiKey.issue(user_id, body.name if body else None)
    uow.session.add(key)
    await uow.commit()
    log.info("api key %s issued to user %s", key.id, user_id)
    return ApiKeyIssued.model_validate({**key.model_dump(), "secret": secret})


@router.get(
    "/users/{user_id}/api-keys",
    response_model=list[ApiKeyPublic],
    responses=problem_responses(404),
    dependencies=[require("users:read", owner="user_id")],
)
async def list_api_keys(session: SessionDep, user_id: UserIdPath) -> list[ApiKey]:
    """A user's API keys, oldest first, revoked ones included (with `revoked_at`); no secrets."""
    if await session.get(User, user_id) is None:
        raise user_not_found(user_id)
    query = (
        select(ApiKey)
        .where(col(ApiKey.user_id) == user_id)
        .order_by(col(ApiKey.created_at), col(ApiKey.id))
    )
    return list((await session.exec(query)).all())


@router.delete(
    "/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 429),
)
async def revoke_api_key(
    uow: UowDep,
    key_id: KeyIdPath,
    principal: Annotated[Principal, require("keys:write")],
    _limit: Annotated[None, WRITES],  # after the principal: counted per API key
) -> None:
    """Revoke an API key and announce it as `api_key.revoked.v1`.

    Your own keys with `keys:write`; anyone's with `users:admin` as well. Revoking a key
    that is already revoked succeeds again and announces nothing; tokens it obtained stop
    working within their lifetime.
    """
    key = await uow.session.get(ApiKey, key_id)
    if key is None or not (principal.is_admin or key.user_id == principal.subject):
        # another user's key answers as if it did not exist: key ids are not to be probed
        raise key_not_found(key_id)
    if key.revoked_at is not None:
        return
    revoked_at = now()
    # conditional, so that of two concurrent revocations only one announces it
    result = await uow.session.exec(
        update(ApiKey)
        .where(col(ApiKey.id) == key_id, col(ApiKey.revoked_at).is_(None))
        .values(revoked_at=revoked_at)
    )
    if not result.rowcount:
        return
    uow.outbox.add(
        ApiKeyRevokedV1(api_key_id=key.id, user_id=key.user_id, revoked_at=revoked_at),
        subject=f"users/{key.user_id}",
        idempotency_key=f"api_key.revoked:{key.id}",
    )
    await uow.commit()
    log.info("api key %s revoked", key_id)
