"""Merchant authentication: ``Authorization: Bearer <secret API key>``, as real providers do.

Every route a merchant calls needs one of ``PAYMENT_PROVIDER_API_KEYS`` (compared in constant
time); paying a checkout is the payer's action and takes only the checkout's unguessable id.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tributary.service.problems import Problem

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="The merchant's secret API key (`PAYMENT_PROVIDER_API_KEYS`).",
)


def matches(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``; every key is compared, each in constant time."""
    candidate = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found


async def api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if credentials is None:
        raise Problem(
            401,
            "An API key is required (Authorization: Bearer <key>).",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not matches(credentials.credentials, request.app.state.api_keys):
        raise Problem(
            401,
            "The API key is not valid.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


API_KEY = Depends(api_key)
