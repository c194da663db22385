"""The load: paced sign-ups through identity's public API, retried until accepted.

Every sign-up carries its own ``Idempotency-Key`` and ``X-Correlation-ID``, so a retry after a
dropped connection, a 5xx or a timeout (the first attempt may have committed) returns the same
user and announces nothing twice. Only 127.0.0.1; bounded concurrency and time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class SignUp:
    index: int
    email: str
    key: str
    """Both the ``Idempotency-Key`` and the ``X-Correlation-ID`` of every attempt."""
    user_id: str | None = None
    attempts: int = 0
    replayed: bool = False
    refused: str | None = None
    """A 4xx answer: the harness or identity is wrong, never retried."""


@dataclass
class LoadResult:
    signups: list[SignUp]
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    """Attempts that failed, by cause (``ConnectError``, ``HTTP 500``...)."""

    @property
    def accepted(self) -> list[SignUp]:
        return [s for s in self.signups if s.user_id is not None]

    @property
    def pending(self) -> list[SignUp]:
        return [s for s in self.signups if s.user_id is None and s.refused is None]

    def summary(self) -> str:
        attempts = sum(s.attempts for s in self.signups)
        replayed = sum(s.replayed for s in self.signups)
        failures = ", ".join(f"{k} {v}" for k, v in self.failures.most_common()) or "none"
        return (
            f"{len(self.accepted)}/{len(self.signups)} sign-ups accepted in {self.seconds:.1f} s, "
            f"{attempts} requests, {replayed} answered as idempotent replays; "
            f"failed attempts: {failures}"
        )


def make_signups(count: int, run: str) -> list[SignUp]:
    return [
        SignUp(index=i, email=f"chaos.{run}.{i:05d}@example.com", key=f"chaos-{run}-{i:05d}")
        for i in range(count)
    ]


class LoadGenerator:
    def __init__(
        self, identity_url: str, signups: list[SignUp], *, rate: float, concurrency: int
    ) -> None:
        assert identity_url.startswith("http://127.0.0.1:"), "load only ever targets 127.0.0.1"
        self.url = identity_url
        self.result = LoadResult(signups)
        self.rate = rate
        self.concurrency = concurrency
        self.done = 0

    async def run(self) -> LoadResult:
        """Offer every pending sign-up, paced at ``rate``/s, until each is accepted (or refused);
        cancel it to stop early."""
        started = time.monotonic()
        gate = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency)
        try:
            async with httpx.AsyncClient(base_url=self.url, timeout=10, limits=limits) as client:

                async def one(signup: SignUp, offset: float) -> None:
                    await asyncio.sleep(max(0.0, started + offset - time.monotonic()))  # pacing
                    async with gate:
                        await self._until_accepted(client, signup)

                todo = self.result.pending
                tasks = [asyncio.create_task(one(s, n / self.rate)) for n, s in enumerate(todo)]
                try:
                    await asyncio.gather(*tasks)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.result.seconds += time.monotonic() - started
        return self.result

    async def _until_accepted(self, client: httpx.AsyncClient, signup: SignUp) -> None:
        backoff = random.Random(signup.index)  # jitter only; no effect on the fault plan
        delay = 0.2
        while signup.user_id is None and signup.refused is None:
            signup.attempts += 1
            try:
                response = await client.post(
                    "/users",
                    json={"email": signup.email, "name": "Chaos Monkey", "locale": "en-GB"},
                    headers={"Idempotency-Key": signup.key, "X-Correlation-ID": signup.key},
                )
            except httpx.HTTPError as exc:
                self.result.failures[type(exc).__name__] += 1
            else:
                if response.status_code == 201:
                    signup.user_id = str(response.json()["id"])
                    signup.replayed = response.headers.get("Idempotent-Replayed") == "true"
                    self.done += 1
                    return
                self.result.failures[f"HTTP {response.status_code}"] += 1
                if 400 <= response.status_code < 500:
                    signup.refused = f"{response.status_code} {response.text[:200]}"
                    return
            await asyncio.sleep(delay * (0.5 + backoff.random()))
            delay = min(delay * 2, 2.0)
