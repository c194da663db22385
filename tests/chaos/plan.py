"""The fault schedule: kinds, run profiles, and the seeded plan a soak follows.

The plan depends on the seed and the profile only (never on timing), so a seed re-runs the same
faults in the same order with the same targets and hold times; when each fault lands relative
to the load still varies with the machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from ..stack import SIGNUP_SERVICES

FaultKind = Literal["kill", "term", "broker_restart", "broker_close", "db_outage", "smtp_pause"]
Database = Literal["sqlite", "postgres"]

KINDS: tuple[FaultKind, ...] = (
    "kill",  # SIGKILL a service, keep it down for the hold, start it again
    "term",  # SIGTERM a service (graceful stop), keep it down for the hold, start it again
    "broker_restart",  # rabbitmqctl stop_app, hold, start_app
    "broker_close",  # rabbitmqctl close_all_connections
    "db_outage",  # PostgreSQL stopped (fast shutdown) or SIGKILLed, held down, started again
    "smtp_pause",  # the SMTP server stopped, held down, started again on the same port
)


def kinds_for(database: Database) -> tuple[FaultKind, ...]:
    """Every kind that applies: SQLite has no server to take away."""
    return tuple(k for k in KINDS if database == "postgres" or k != "db_outage")


@dataclass(frozen=True)
class Profile:
    """How big and how rough a run is."""

    name: str
    signups: int
    rate: float
    """Most sign-ups offered per second; the load is paced to last as long as the faults."""
    concurrency: int
    """Sign-up requests in flight at most."""
    faults: int
    gap: tuple[float, float]
    """Seconds between the end of one fault and the start of the next."""
    holds: dict[FaultKind, tuple[float, float]]
    """Seconds each kind keeps its fault in place (min, max)."""
    retry_tiers: tuple[float, ...]
    """Delayed-retry tiers of the services; an SMTP pause must stay well below their sum."""
    quiesce_timeout: float
    load_timeout: float
    """Seconds after the last fault for sign-ups still not accepted."""
    progress_every: float
    """Seconds between progress lines."""


PROFILES: dict[str, Profile] = {
    # inside ``make test``: about a minute per database, every kind at least once
    "quick": Profile(
        name="quick",
        signups=300,
        rate=8.0,
        concurrency=8,
        faults=0,  # one per applicable kind
        gap=(0.5, 2.0),
        holds={
            "kill": (0.0, 1.0),
            "term": (0.0, 1.0),
            "broker_restart": (0.5, 2.0),
            "broker_close": (0.0, 0.0),
            "db_outage": (2.0, 5.0),
            "smtp_pause": (1.0, 4.0),
        },
        retry_tiers=(0.5, 2.0, 5.0),
        quiesce_timeout=60.0,
        load_timeout=45.0,
        progress_every=10.0,
    ),
    # ``make chaos``: production retry tiers, outages up to two minutes
    "soak": Profile(
        name="soak",
        signups=5000,
        rate=25.0,
        concurrency=16,
        faults=0,  # scaled with the sign-ups: one per 250
        gap=(5.0, 20.0),
        holds={
            "kill": (0.0, 5.0),
            "term": (0.0, 5.0),
            "broker_restart": (2.0, 30.0),
            "broker_close": (0.0, 0.0),
            "db_outage": (10.0, 120.0),
            "smtp_pause": (5.0, 45.0),
        },
        retry_tiers=(1.0, 10.0, 60.0),
        quiesce_timeout=600.0,
        load_timeout=300.0,
        progress_every=30.0,
    ),
}


@dataclass(frozen=True)
class Fault:
    """One planned fault."""

    index: int
    kind: FaultKind
    target: str
    """A service name, ``broker``, ``postgres`` or ``smtp``."""
    how: str
    """``stop`` or ``kill`` for a database outage; the kind's only way otherwise."""
    gap: float
    """Seconds to wait after the previous fault (or the start of the load) before this one."""
    hold: float

    def describe(self) -> str:
        how = f" ({self.how})" if self.kind == "db_outage" else ""
        return f"{self.kind}{how} {self.target}"


def fault_count(profile: Profile, signups: int, kinds: tuple[FaultKind, ...]) -> int:
    if profile.faults:
        return profile.faults
    if profile.name == "quick":
        return len(kinds)
    return max(len(kinds), signups // 250)


def make_plan(seed: int, profile: Profile, kinds: tuple[FaultKind, ...], count: int) -> list[Fault]:
    """``count`` faults: every kind once in a shuffled order first, then random kinds."""
    rng = random.Random(seed)
    deck = list(kinds)
    rng.shuffle(deck)
    while len(deck) < count:
        deck.append(rng.choice(kinds))
    plan = []
    for index, kind in enumerate(deck[:count]):
        low, high = profile.holds[kind]
        plan.append(
            Fault(
                index=index,
                kind=kind,
                target=_target(rng, kind),
                how=rng.choice(("stop", "kill")) if kind == "db_outage" else kind,
                gap=round(rng.uniform(*profile.gap), 2),
                hold=round(rng.uniform(low, high), 2),
            )
        )
    return plan


# Seconds a fault takes beyond its hold (a service restart, rabbitmqctl), roughly, on 2 cores.
OVERHEAD: dict[FaultKind, float] = {
    "kill": 8.0,
    "term": 10.0,
    "broker_restart": 8.0,
    "broker_close": 2.0,
    "db_outage": 3.0,
    "smtp_pause": 0.0,
}


def pace(profile: Profile, signups: int, plan: list[Fault]) -> float:
    """Sign-ups per second so that the load lasts about as long as the planned faults (faults
    that hit nothing in flight prove little), never faster than the profile's rate."""
    planned = sum(f.gap + f.hold + OVERHEAD[f.kind] for f in plan)
    return min(profile.rate, signups / planned) if planned else profile.rate


def _target(rng: random.Random, kind: FaultKind) -> str:
    if kind in ("kill", "term"):
        return rng.choice(SIGNUP_SERVICES)
    return {"db_outage": "postgres", "smtp_pause": "smtp"}.get(kind, "broker")
