"""Request limits: body size (413) and rate limits (429), both answered as problem details.

Body size
    ``TRIBUTARY_MAX_BODY_BYTES`` (default 64 KiB). ``BodyLimit`` is pure ASGI and runs before
    any parsing: a ``Content-Length`` over the limit is refused without reading the body, and
    a body without one (chunked) is counted as it streams in and refused as soon as it passes
    the limit, so no more than the limit is ever held in memory.

Rate limits
    The ``limits`` library, sliding window counter strategy (two counters per key, close to
    a true moving window without its memory). Storage: in process by default; Redis when
    ``REDIS_URL`` is set, so that every replica shares the counts. A route opts in with
    ``dependencies=[..., rate_limit("signup", per_address="20/minute")]``; the rate of a
    policy is replaced by the environment variable ``TRIBUTARY_RATE_<NAME>`` (limits'
    notation: ``"20/minute"``, ``"5/second;100/hour"``).

    * Per address: ``request.client.host``. Behind a reverse proxy that is the proxy, unless
      uvicorn runs with ``--proxy-headers`` and ``--forwarded-allow-ips`` naming the proxy:
      then it is the client address from ``X-Forwarded-For``.
    * Per key: ``request.state.principal.client_id``, set by the auth dependency; it must
      therefore come BEFORE the rate-limit dependency in the route's ``dependencies``. A
      request without a principal is counted per address instead.

    Redis unreachable: the limiter fails OPEN. Requests are let through unlimited and a
    warning is logged, and Redis is not asked again for ``PAUSE_SECONDS``; refusing every
    request, or answering 500, would turn a cache outage into a full outage of the API.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tributary.service.problems import Problem, TrackedSend

log = logging.getLogger("tributary.service.limits")

RATE_PREFIX = "TRIBUTARY_RATE_"
PAUSE_SECONDS = 5.0
"""After a storage failure, Redis is left alone (and requests not limited) this long."""
TIMEOUT_SECONDS = 1.0
"""The longest a request waits for the rate-limit storage before it is let through."""


class LimitSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    max_body_bytes: int = Field(
        default=64 * 1024, ge=0, validation_alias="TRIBUTARY_MAX_BODY_BYTES"
    )
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")


# -- body size ---------------------------------------------------------------------------------

_DIGITS = re.compile(rb"^[0-9]+$")


def too_large(limit: int) -> Problem:
    return Problem(
        413,
        f"The request body is larger than the {limit} bytes this service accepts.",
    )


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length``, None without one; ValueError if malformed or contradictory.

    Repeated or comma-separated values are accepted when they agree (RFC 9110 §8.6).
    """
    values = [
        part.strip()
        for name, value in headers
        if name.lower() == b"content-length"
        for part in value.split(b",")
    ]
    if not values:
        return None
    if any(not _DIGITS.fullmatch(v) for v in values) or len({v.lstrip(b"0") for v in values}) > 1:
        raise ValueError("malformed Content-Length")
    digits = values[0].lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 19 else 2**63  # a huge value is just too large


class _BodyTooLarge(Problem):
    pass


class BodyLimit:
    """Pure ASGI: 413 for a body over ``max_bytes``, before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            length = declared_length(scope["headers"])
        except ValueError:
            bad = Problem(400, "The Content-Length header is not a valid length.")
            await bad.response()(scope, receive, send)
            return
        if length is not None and length > self.max_bytes:
            await too_large(self.max_bytes).response()(scope, receive, send)
            return

        received = 0
        watch = TrackedSend(send)

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body, so
                    # this reaches the problem handler; anything else lands below
                    problem = too_large(self.max_bytes)
                    raise _BodyTooLarge(413, str(problem.detail), headers=problem.headers)
            return message

        try:
            await self.app(scope, counted, watch)
        except _BodyTooLarge as exc:
            if watch.started:
                raise
            await exc.response()(scope, receive, send)


# -- rate limits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_in: int
    """Seconds until the window frees a request (at least 1)."""


def storage_uri(redis_url: str | None) -> str:
    """``redis://host:6379/0`` as limits' async URI (``async+redis://...``); memory without."""
    if not redis_url:
        return "async+memory://"
    return redis_url if redis_url.startswith("async+") else f"async+{redis_url}"


class RateLimiter:
    """Rate limits of one app (``app.state.rate_limiter``), shared by every route's policy.

    ``rates`` replace the rates routes declare, by policy name (``{"signup": "5/minute"}``);
    ``from_env`` reads them from ``TRIBUTARY_RATE_<NAME>``.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        rates: Mapping[str, str] | None = None,
        pause_seconds: float = PAUSE_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
    ) -> None:
        self.uri = storage_uri(redis_url)
        self.rates = {name.lower(): rate for name, rate in (rates or {}).items()}
        for rate in self.rates.values():
            parse_many(rate)  # a typo in the environment fails at start-up, not per request
        self.pause_seconds = pause_seconds
        self.timeout_seconds = timeout_seconds
        options: dict[str, float | str | bool] = {}
        if self.shared:
            options = {"connect_timeout": timeout_seconds, "stream_timeout": timeout_seconds}
        # the Redis client connects on first use, in the event loop that uses it
        storage = storage_from_string(self.uri, **options)
        if not isinstance(storage, Storage):
            raise TypeError(f"{self.uri.split(':')[0]} is not an async storage")
        self.storage = storage
        self.strategy = SlidingWindowCounterRateLimiter(storage)
        self._parsed: dict[str, list[RateLimitItem]] = {}
        self._down_until = 0.0
        self._down = False

    @classmethod
    def from_env(
        cls, settings: LimitSettings | None = None, environ: Mapping[str, str] | None = None
    ) -> RateLimiter:
        """Storage from ``REDIS_URL``, rates from every ``TRIBUTARY_RATE_<NAME>``."""
        env = os.environ if environ is None else environ
        rates = {
            key[len(RATE_PREFIX) :]: value
            for key, value in env.items()
            if key.upper().startswith(RATE_PREFIX) and value.strip()
        }
        return cls((settings or LimitSettings()).redis_url, rates=rates)

    @property
    def shared(self) -> bool:
        return not self.uri.startswith("async+memory")

    def items(self, name: str, default: str) -> list[RateLimitItem]:
        rate = self.rates.get(name.lower(), default)
        if rate not in self._parsed:
            self._parsed[rate] = parse_many(rate)
        return self._parsed[rate]

    async def hit(self, name: str, default: str, *identifiers: str) -> Verdict | None:
        """Count one request; None when the storage is unavailable (the request goes through)."""
        if self.shared and time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout_seconds * 2):
                verdict = await self._hit(name, default, identifiers)
        except Exception as exc:
            if not (self.shared and isinstance(exc, self._storage_errors())):
                raise
            self._down_until = time.monotonic() + self.pause_seconds
            if not self._down:
                log.warning(
                    "rate-limit storage unavailable (%s): requests are not rate limited "
                    "until it answers again",
                    type(exc).__name__,
                )
            self._down = True
            return None
        if self._down:
            log.info("rate-limit storage answers again: rate limits apply")
            self._down = False
        return verdict

    def _storage_errors(self) -> tuple[type[Exception], ...]:
        found = self.storage.base_exceptions
        return (
            StorageError,
            OSError,
            TimeoutError,
            *(found if isinstance(found, tuple) else (found,)),
        )

    async def _hit(self, name: str, default: str, identifiers: tuple[str, ...]) -> Verdict:
        tightest: Verdict | None = None
        for item in self.items(name, default):
            allowed = await self.strategy.hit(item, name, *identifiers)
            stats = await self.strategy.get_window_stats(item, name, *identifiers)
            verdict = Verdict(
                allowed=allowed,
                limit=item.amount,
                remaining=max(0, stats.remaining),
                reset_in=max(1, math.ceil(stats.reset_time - time.time())),
            )
            if not allowed:
                return verdict
            if tightest is None or verdict.remaining < tightest.remaining:
                tightest = verdict
        assert tightest is not None  # noqa: S101 -- parse_many never returns an empty list
        return tightest

    async def aclose(self) -> None:
        """Close the Redis connections (or stop the in-memory expiry task); reusable after."""
        storage = self.storage
        if isinstance(storage, RedisStorage):
            pool: Any = getattr(getattr(storage.bridge, "storage", None), "connection_pool", None)
            if pool is not None:
                pool.disconnect()
        elif isinstance(storage, MemoryStorage) and storage.timer is not None:
            storage.timer.cancel()


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _headers(verdict: Verdict) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers (RateLimit-Limit/-Remaining/-Reset, seconds)."""
    return {
        "RateLimit-Limit": str(verdict.limit),
        "RateLimit-Remaining": str(verdict.remaining),
        "RateLimit-Reset": str(verdict.reset_in),
    }


def too_many_requests(verdict: Verdict) -> Problem:
    return Problem(
        429,
        f"Too many requests; retry in {verdict.reset_in} s.",
        headers={"Retry-After": str(verdict.reset_in), **_headers(verdict)},
    )


def rate_limit(name: str, *, per_address: str | None = None, per_key: str | None = None) -> Any:
    """A dependency counting the request against policy ``name``: 429 when over its rate.

    ``per_address``/``per_key``: the rate in limits' notation (``"20/minute"``), counted per
    client address and per API key (the principal's ``client_id``; the auth dependency must
    come first). ``TRIBUTARY_RATE_<NAME>`` replaces both rates.
    """
    if per_address is None and per_key is None:
        raise ValueError("rate_limit needs per_address, per_key or both")

    async def limit(request: Request, response: Response) -> None:
        limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
        if limiter is None:
            return
        checks: list[tuple[str, str, str]] = []
        if per_address is not None:
            checks.append((per_address, "address", client_address(request)))
        if per_key is not None:
            principal = getattr(request.state, "principal", None)
            client_id = getattr(principal, "client_id", None)
            if client_id:
                checks.append((per_key, "key", str(client_id)))
            else:
                checks.append((per_key, "address", client_address(request)))
        shown: Verdict | None = None
        for rate, kind, who in checks:
            verdict = await limiter.hit(name, rate, kind, who)
            if verdict is None:
                continue
            if not verdict.allowed:
                raise too_many_requests(verdict)
            if shown is None or verdict.remaining < shown.remaining:
                shown = verdict
        if shown is not None:
            response.headers.update(_headers(shown))

    limit.__name__ = f"rate_limit_{name}"
    return Depends(limit)


def install(app: FastAPI, settings: LimitSettings | None = None) -> None:
    """The body limit middleware and ``app.state.rate_limiter`` (from the environment)."""
    settings = settings or LimitSettings()
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.rate_limiter = RateLimiter.from_env(settings)


async def close(app: FastAPI) -> None:
    limiter: RateLimiter | None = getattr(app.state, "rate_limiter", None)
    if limiter is not None:
        await limiter.aclose()
