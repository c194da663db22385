"""Users: sign-up, profile changes and roles."""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated, cast

from fastapi import APIRouter, Header, Path, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.contracts.events import Role, RoleChangedV1, UserCreatedV1, UserEmailChangedV1
from tributary.identity.errors import email_taken, idempotency_key_reused, user_not_found
from tributary.identity.models import SignUpKey, User, normalize_email
from tributary.identity.rates import SIGN_UP, WRITES
from tributary.identity.schemas import (
    RoleChange,
    UserCreate,
    UserPublic,
    UserUpdate,
)
from tributary.messaging.db import now
from tributary.messaging.uow import UnitOfWork
from tributary.service.app import SessionDep, UowDep
from tributary.service.auth import InvalidToken, KeysUnavailable, public, require
from tributary.service.problems import problem_responses, unavailable

log = logging.getLogger("tributary.identity.api")
router = APIRouter(tags=["users"])

UserIdPath = Annotated[str, Path(max_length=60, examples=["usr_0123456789abcdef0123"])]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        description="Retry-safe sign-up: the same key and body return the same user.",
    ),
]


async def caller(request: Request) -> str:
    """Who is calling an open route: the subject of a valid bearer token, else ``public``.

    ``request.state.principal`` when an auth dependency verified the token already; else a
    bearer token sent anyway is verified here. An invalid one counts as none (the route is
    open to all); keys that cannot be read are a 503, as on any authenticated route.
    """
    principal = getattr(request.state, "principal", None)
    if principal is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                principal = await request.app.state.auth.verify(token.strip())
            except InvalidToken:
                principal = None
            except KeysUnavailable as exc:
                raise unavailable(f"{exc}; retry later", retry_after=exc.retry_after) from None
    subject = getattr(principal, "subject", None)
    return str(subject) if subject else "public"


def scoped_key(caller: str, key: str | None) -> str | None:
    """How an ``Idempotency-Key`` is stored: ``<caller>:<SHA-256 of the key>``.

    Scoped to the caller, so that nobody can replay, or learn of, another caller's key.
    Hashed, so that any key up to the header's 200 characters fits the column with its
    caller, and the key (which may hold anything, an address even) is not stored.
    """
    if key is None:
        return None
    if len(caller) > 100:
        caller = hashlib.sha256(caller.encode()).hexdigest()
    return f"{caller}:{hashlib.sha256(key.encode()).hexdigest()}"


async def _email_owner(session: AsyncSession, email: str) -> User | None:
    query = select(User).where(col(User.email_normalized) == normalize_email(email))
    return (await session.exec(query)).first()


async def _replay(
    session: AsyncSession, key: str | None, request_hash: str, response: Response
) -> User | None:
    """The user an earlier request with ``key`` made, if any; 422 if its body was different."""
    earlier = await session.get(SignUpKey, key) if key is not None else None
    if earlier is None:
        return None
    if earlier.request_hash != request_hash:
        raise idempotency_key_reused()
    response.headers["Idempotent-Replayed"] = "true"
    return await session.get(User, earlier.user_id)


async def _register(
    uow: UnitOfWork, body: UserCreate, idempotency_key: str | None, request_hash: str
) -> User:
    user = User.register(email=body.email, name=body.name, plan=body.plan, locale=body.locale)
    uow.session.add(user)
    if idempotency_key is not None:
        await uow.session.flush()  # the key refers to the user: insert the user first
        uow.session.add(
            SignUpKey(
                key=idempotency_key,
                request_hash=request_hash,
                user_id=user.id,
                created_at=user.created_at,
            )
        )
    uow.outbox.add(
        UserCreatedV1(
            user_id=user.id,
            email=user.email,
            name=user.name,
            plan=body.plan,
            locale=user.locale,
            created_at=user.created_at,
        ),
        subject=f"users/{user.id}",
        idempotency_key=f"user.created:{user.id}",
    )
    return user


@router.post(
    "/users",
    status_code=201,
    response_model=UserPublic,
    dependencies=[public(), SIGN_UP],
    responses=problem_responses(409, 422, 429),
)
async def create_user(
    body: UserCreate,
    uow: UowDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> User:
    """Sign a user up (role `member`) and announce it as `user.created.v1`.

    With an `Idempotency-Key` header a retry of the same request returns the same user (header
    `Idempotent-Replayed: true`) and announces nothing again; the key with another body is a
    422. An email address already registered, in any letter case, is a 409. Keys are scoped to
    the caller (the bearer token's user, or every caller without one).
    """
    idempotency_key = scoped_key(await caller(request), idempotency_key)
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if (user := await _replay(uow.session, idempotency_key, request_hash, response)) is not None:
        return user
    # No look-up of the address first: its unique index answers in the insert (one statement
    # fewer per sign-up), for a taken address and for a concurrent twin alike.
    try:
        user = await _register(uow, body, idempotency_key, request_hash)
        await uow.commit()
    except IntegrityError:
        await uow.rollback()  # the address (or the key) is taken, maybe by a concurrent request
    else:
        log.info("user %s signed up", user.id)
        return user
    # The address is taken. If it was taken by a concurrent request with the same key, which
    # committed after the key's look-up above, answer as that request did.
    if earlier := await _replay(uow.session, idempotency_key, request_hash, response):
        return earlier
    raise email_taken()


@router.get(
    "/users/{user_id}",
    response_model=UserPublic,
    responses=problem_responses(404),
    dependencies=[require("users:read", owner="user_id")],
)
async def get_user(session: SessionDep, user_id: UserIdPath) -> User:
    """One user: profile, plan and role."""
    user = await session.get(User, user_id)
    if user is None:
        raise user_not_found(user_id)
    return user


@router.patch(
    "/users/{user_id}",
    response_model=UserPublic,
    responses=problem_responses(404, 409, 422, 429),
    dependencies=[require("users:write", owner="user_id"), WRITES],
)
async def update_user(body: UserUpdate, uow: UowDep, user_id: UserIdPath) -> User:
    """Change a user's email, name or locale (fields left out stay as they are).

    A new email address is announced as `user.email_changed.v1`; one another user has already
    registered is a 409. A request that changes nothing announces nothing.
    """
    user = await uow.session.get(User, user_id, with_for_update=True)
    if user is None:
        raise user_not_found(user_id)
    old_email = user.email
    changes = body.model_dump(exclude_unset=True)
    if (email := changes.get("email")) is not None and email != old_email:
        owner = await _email_owner(uow.session, email)
        if owner is not None and owner.id != user.id:
            raise email_taken()
        user.email_normalized = normalize_email(email)
    changed = {field for field, value in changes.items() if getattr(user, field) != value}
    if not changed:
        return user
    for field in changed:
        setattr(user, field, changes[field])
    user.updated_at = now()
    uow.session.add(user)
    if "email" in changed:
        uow.outbox.add(
            UserEmailChangedV1(
                user_id=user.id,
                old_email=old_email,
                new_email=user.email,
                changed_at=user.updated_at,
            ),
            subject=f"users/{user.id}",
        )
    try:
        await uow.commit()
    except IntegrityError:
        await uow.rollback()
        raise email_taken() from None
    log.info("user %s changed %s", user.id, ", ".join(sorted(changed)))
    return user


@router.put(
    "/users/{user_id}/role",
    response_model=UserPublic,
    responses=problem_responses(404, 422, 429),
    dependencies=[require("roles:write"), WRITES],
)
async def change_role(body: RoleChange, uow: UowDep, user_id: UserIdPath) -> User:
    """Set a user's role: `member` (every new user), `admin` or `owner`.

    A change is announced as `role.changed.v1`; setting the role the user already has
    announces nothing.
    """
    user = await uow.session.get(User, user_id, with_for_update=True)
    if user is None:
        raise user_not_found(user_id)
    if user.role == body.role:
        return user
    old_role = user.role
    user.role = body.role
    user.updated_at = now()
    uow.session.add(user)
    uow.outbox.add(
        RoleChangedV1(
            user_id=user.id,
            old_role=cast(Role, old_role),
            new_role=body.role,
            changed_at=user.updated_at,
        ),
        subject=f"users/{user.id}",
    )
    await uow.commit()
    log.info("user %s is now %s (was %s)", user.id, body.role, old_role)
    return user
