"""Quiet hours: the window's clock rules (time zones, midnight, daylight saving time) against a
brute-force reference, and holding on SQLite and PostgreSQL -- handler by handler, and through
the running app on the real broker, across a restart."""

from __future__ import annotations

import time as wall_time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from tributary.messaging.db import OutboxRow
from tributary.notification.quiet import job_ref, set_quiet_hours
from tributary.notification.quiet_models import HeldDelivery
from tributary.notification.quiet_window import QuietWindow, known_zones, parse_time
from tributary.notification.schemas import QuietHours
from tributary.notification.store import lock_inbox, set_choice
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .deferred import Deferred, Restartable, clock, job, restartable
from .events import new_user, report_ready, subscription_activated, user_created, workspace_created

BERLIN = ZoneInfo("Europe/Berlin")
UTC_ZONE = ZoneInfo("UTC")


def at(
    zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int, *, fold: int = 0
) -> datetime:
    """An instant given by a zone's clock (``fold=1``: the second time the clock shows it)."""
    return datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold).astimezone(UTC)


def window(start: str, end: str, zone: str = "Europe/Berlin") -> QuietWindow:
    return QuietWindow.parse(start, end, zone)


# -- the window: unit tests ---------------------------------------------------------------------


def test_a_window_within_a_day_and_one_across_midnight() -> None:
    day = window("09:00", "17:30", "UTC")
    assert day.until(datetime(2026, 6, 1, 9, 0, tzinfo=UTC)) == datetime(
        2026, 6, 1, 17, 30, tzinfo=UTC
    )
    assert day.until(datetime(2026, 6, 1, 8, 59, 59, tzinfo=UTC)) is None
    assert day.until(datetime(2026, 6, 1, 17, 30, tzinfo=UTC)) is None  # the end is outside
    assert day.until(datetime(2026, 6, 1, 12, 0)) == datetime(2026, 6, 1, 17, 30, tzinfo=UTC)

    night = window("22:00", "07:00")  # Berlin, summer: UTC+2
    assert night.until(at(BERLIN, 2026, 6, 1, 23, 30)) == at(BERLIN, 2026, 6, 2, 7, 0)
    assert night.until(at(BERLIN, 2026, 6, 2, 6, 59)) == at(BERLIN, 2026, 6, 2, 7, 0)
    assert night.until(at(BERLIN, 2026, 6, 2, 0, 0)) == at(BERLIN, 2026, 6, 2, 7, 0)
    assert night.until(at(BERLIN, 2026, 6, 2, 7, 0)) is None
    assert night.until(at(BERLIN, 2026, 6, 1, 21, 59)) is None
    assert night.contains(at(BERLIN, 2026, 6, 1, 22, 0))
    assert at(BERLIN, 2026, 6, 2, 7, 0) == datetime(2026, 6, 2, 5, 0, tzinfo=UTC)


def test_the_zone_decides_not_the_servers_clock() -> None:
    kolkata = window("21:30", "06:15", "Asia/Kolkata")  # UTC+05:30, no DST
    assert kolkata.until(datetime(2026, 6, 1, 16, 0, tzinfo=UTC)) == datetime(
        2026, 6, 2, 0, 45, tzinfo=UTC
    )
    assert kolkata.until(datetime(2026, 6, 1, 15, 59, tzinfo=UTC)) is None
    chatham = window("23:00", "06:00", "Pacific/Chatham")  # UTC+12:45 / +13:45
    assert chatham.until(at(ZoneInfo("Pacific/Chatham"), 2026, 7, 1, 23, 0)) == at(
        ZoneInfo("Pacific/Chatham"), 2026, 7, 2, 6, 0
    )
    seconds = window("22:00:30", "22:00:45", "UTC")
    assert seconds.until(datetime(2026, 1, 1, 22, 0, 30, tzinfo=UTC)) == datetime(
        2026, 1, 1, 22, 0, 45, tzinfo=UTC
    )
    assert seconds.show() == ("22:00:30", "22:00:45", "UTC")
    assert window("22:00:00", "07:00").show() == ("22:00", "07:00", "Europe/Berlin")


def test_daylight_saving_time_in_berlin() -> None:
    # 2026-03-29: the clock jumps from 02:00 to 03:00 -- the night is an hour shorter
    night = window("22:00", "07:00")
    start = at(BERLIN, 2026, 3, 28, 22, 0)
    end = night.until(start)
    assert end == at(BERLIN, 2026, 3, 29, 7, 0)
    assert end is not None
    assert end - start == timedelta(hours=8)
    # an end the clock skips ends quiet hours at the jump
    skipped = window("22:00", "02:30")
    assert skipped.until(at(BERLIN, 2026, 3, 29, 1, 30)) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert not skipped.contains(at(BERLIN, 2026, 3, 29, 3, 0))

    # 2026-10-25: the clock goes back from 03:00 to 02:00 -- the night is an hour longer
    start = at(BERLIN, 2026, 10, 24, 22, 0)
    end = night.until(start)
    assert end == at(BERLIN, 2026, 10, 25, 7, 0)
    assert end is not None
    assert end - start == timedelta(hours=10)
    # an end the clock shows twice: the first time; then quiet again until the second
    twice = window("22:00", "02:30")
    first = twice.until(at(BERLIN, 2026, 10, 25, 1, 0))
    assert first == at(BERLIN, 2026, 10, 25, 2, 30) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert not twice.contains(at(BERLIN, 2026, 10, 25, 2, 40))
    again = at(BERLIN, 2026, 10, 25, 2, 10, fold=1)
    assert again == datetime(2026, 10, 25, 1, 10, tzinfo=UTC)
    assert twice.until(again) == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)


def test_daylight_saving_time_elsewhere() -> None:
    new_york = ZoneInfo("America/New_York")  # 2026-03-08 02:00 EST -> 03:00 EDT
    assert window("23:00", "06:00", "America/New_York").until(
        at(new_york, 2026, 3, 7, 23, 30)
    ) == datetime(2026, 3, 8, 10, 0, tzinfo=UTC)
    lord_howe = ZoneInfo("Australia/Lord_Howe")  # 2026-04-05 02:00 +11 -> 01:30 +10:30
    short = window("01:00", "01:45", "Australia/Lord_Howe")
    assert not short.contains(at(lord_howe, 2026, 4, 5, 1, 50))
    back = at(lord_howe, 2026, 4, 5, 1, 30, fold=1)  # the clock went back half an hour
    assert back == datetime(2026, 4, 4, 15, 0, tzinfo=UTC)
    assert short.until(back) == at(lord_howe, 2026, 4, 5, 1, 45, fold=1)


def test_the_parser_refuses_what_is_not_a_window() -> None:
    good = QuietWindow.parse("22:00", "07:00", "Europe/Berlin")
    assert good == QuietWindow(time(22), time(7), BERLIN)
    for start, end, zone in [
        ("7:00", "08:00", "UTC"),
        ("24:00", "08:00", "UTC"),
        ("22:60", "08:00", "UTC"),
        ("22:00:60", "08:00", "UTC"),
        (" 22:00", "08:00", "UTC"),
        ("22:00\n", "08:00", "UTC"),
        ("\uff12\uff12:\uff10\uff10", "08:00", "UTC"),  # fullwidth digits
        ("22.00", "08:00", "UTC"),
        ("22:00", "22:00", "UTC"),
        ("22:00", "22:00:00", "UTC"),
        ("22:00", "07:00", "Mars/Olympus_Mons"),
        ("22:00", "07:00", "localtime"),
        ("22:00", "07:00", "../../etc/passwd"),
        ("22:00", "07:00", "europe/berlin"),
        ("22:00", "07:00", ""),
    ]:
        with pytest.raises(ValueError, match="must"):
            QuietWindow.parse(start, end, zone)
        with pytest.raises(ValidationError):
            QuietHours.model_validate({"start": start, "end": end, "time_zone": zone})


# -- the window: properties ---------------------------------------------------------------------

# zones whose clocks change in odd ways: 30-minute DST, changes at midnight, 2-hour DST, +12:45
TRICKY = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
    "America/Havana",
    "Antarctica/Troll",
    "Pacific/Chatham",
    "Africa/Casablanca",
    "Asia/Kolkata",
    "UTC",
]
ALL_ZONES = sorted(known_zones())


def _transitions(zone: ZoneInfo) -> list[datetime]:
    found = []
    moment = datetime(2020, 1, 1, tzinfo=UTC)
    offset = moment.astimezone(zone).utcoffset()
    while moment < datetime(2031, 1, 1, tzinfo=UTC):
        moment += timedelta(hours=1)
        now_offset = moment.astimezone(zone).utcoffset()
        if now_offset != offset:
            found.append(moment)
            offset = now_offset
    return found


TRANSITIONS = {name: _transitions(ZoneInfo(name)) for name in TRICKY}
minutes = st.builds(time, st.integers(0, 23), st.integers(0, 59))


@st.composite
def instants(draw: st.DrawFn, zone: str) -> datetime:
    """Anywhere in 2000-2060, or within a day and a half of one of the zone's clock changes."""
    near = TRANSITIONS.get(zone) or []
    close_to_a_change = draw(st.booleans())
    if near and close_to_a_change:
        base = draw(st.sampled_from(near))
        return base + timedelta(seconds=draw(st.integers(-36 * 3600, 36 * 3600)))
    seconds = draw(st.integers(0, 60 * 365 * 86400))
    return datetime(2000, 1, 1, tzinfo=UTC) + timedelta(
        seconds=seconds, microseconds=draw(st.integers(0, 999_999))
    )


def brute_inside(w: QuietWindow, moment: datetime) -> bool:
    """Every minute of the day from start on, one by one, until the end: is the clock's in?"""
    start, end = w.start.hour * 60 + w.start.minute, w.end.hour * 60 + w.end.minute
    quiet = set()
    minute = start
    while minute != end:
        quiet.add(minute)
        minute = (minute + 1) % 1440
    shown = moment.astimezone(w.zone)
    return shown.hour * 60 + shown.minute in quiet


def brute_until(w: QuietWindow, moment: datetime) -> datetime | None:
    """Minute by minute (every clock change is on a whole minute since 1990) to the first one
    outside."""
    if not brute_inside(w, moment):
        return None
    step = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while brute_inside(w, step):
        step += timedelta(minutes=1)
    return step


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_inside_and_the_end_agree_with_a_brute_force_reference(data: st.DataObject) -> None:
    zone = data.draw(st.one_of(st.sampled_from(TRICKY), st.sampled_from(ALL_ZONES)))
    start, end = data.draw(minutes), data.draw(minutes)
    if start == end:
        return
    w = QuietWindow(start, end, ZoneInfo(zone))
    moment = data.draw(instants(zone))
    assert w.contains(moment) == brute_inside(w, moment)
    until = w.until(moment)
    assert until == brute_until(w, moment)
    if until is not None:
        assert until > moment
        assert not w.contains(until)
        assert until - moment <= timedelta(hours=26)


texts = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[0-9]{1,3}:[0-9]{1,3}(:[0-9]{1,3})?", fullmatch=True),
    st.builds(lambda t: t.strftime("%H:%M"), minutes),
)
zones = st.one_of(st.text(max_size=40), st.sampled_from(ALL_ZONES), st.sampled_from(["localtime"]))


@settings(max_examples=300, deadline=None)
@given(texts, texts, zones)
def test_the_parser_takes_exactly_canonical_windows(start: str, end: str, zone: str) -> None:
    try:
        w = QuietWindow.parse(start, end, zone)
    except ValueError:
        with pytest.raises(ValidationError):
            QuietHours.model_validate({"start": start, "end": end, "time_zone": zone})
        return
    assert w.start != w.end
    assert w.time_zone == zone in known_zones()
    assert parse_time(start) == w.start
    assert parse_time(end) == w.end
    assert start in (w.show()[0], f"{w.show()[0]}:00")  # HH:MM, or with :00 seconds
    shown = QuietHours.model_validate({"start": start, "end": end, "time_zone": zone})
    assert shown.window() == w
    assert QuietHours.of(w) is not None


# -- holding, handler by handler ----------------------------------------------------------------


@pytest.fixture
def deferred(sessions: async_sessionmaker[AsyncSession]) -> Deferred:
    return Deferred(sessions)


async def known_user(deferred: Deferred) -> str:
    user = new_user()
    await deferred.handle(user_created(user))
    return user


async def quiet(deferred: Deferred, user: str, start: str, end: str, zone: str = "UTC") -> None:
    async with await deferred.in_uow() as uow:
        await lock_inbox(uow.session, user)
        await set_quiet_hours(uow, user, None if not start else QuietWindow.parse(start, end, zone))
        await uow.commit()


async def quiet_until(deferred: Deferred, user: str, seconds: float) -> datetime:
    """Quiet hours (Asia/Kolkata's clock) from an hour ago until ``seconds`` from now."""
    zone = ZoneInfo("Asia/Kolkata")
    now = datetime.now(zone)
    end = (now + timedelta(seconds=seconds)).replace(microsecond=0)
    await quiet(deferred, user, clock(now - timedelta(hours=1)), clock(end), "Asia/Kolkata")
    return end.astimezone(UTC)


async def test_held_for_every_channel_but_in_app_and_delivered_once_by_the_deliver_job(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    end = await quiet_until(deferred, user, 600)
    report, urgent = report_ready(user), workspace_created(user)
    for event in (report, report, urgent, report):  # redelivered: held once
        await deferred.handle(event)

    assert [n.category for n in await deferred.inbox(user)] == ["reports", "account"]
    assert [e["subject"] for e in await deferred.emails(user)] == ["Your workspace is ready"]
    assert [n.category for n in deferred.other.delivered] == ["account"]  # urgent: at once
    held = await deferred.held(user)
    assert sorted((h.channel, h.release_at) for h in held) == [("email", end), ("webhook", end)]
    [(deliver, due)] = await deferred.scheduled("deliver")  # one job for both
    assert (deliver.ref, deliver.user_id, due) == (job_ref(user, end), user, end)

    early = job("deliver", job_ref(user, end - timedelta(seconds=1)), user)
    await deferred.run(early)  # a job for an earlier time delivers nothing of later
    assert len(await deferred.held(user)) == 2
    await deferred.run(deliver)
    await deferred.run(deliver)  # twice: sent once
    await deferred.run(deliver, replay=True)
    subjects = [e["subject"] for e in await deferred.emails(user)]
    assert subjects == ["Your workspace is ready", "Your report is ready"]
    assert [n.category for n in deferred.other.delivered] == ["account", "reports"]
    assert await deferred.held(user) == []
    assert [n.category for n in await deferred.inbox(user)] == ["reports", "account"]
    await deferred.handle(report)  # a late copy while quiet: held, and sent no more
    await deferred.run(deliver)
    assert len(await deferred.emails(user)) == 2
    assert deferred.metrics.held.labels("email")._value.get() == 2
    assert deferred.metrics.released.labels("email", "delivered")._value.get() == 2


async def test_preferences_are_read_when_quiet_hours_end(deferred: Deferred) -> None:
    user = await known_user(deferred)
    end = await quiet_until(deferred, user, 600)
    await deferred.handle(report_ready(user))
    await deferred.handle(subscription_activated(user))  # billing email is off by default
    assert {h.source.split(":")[0] for h in await deferred.held(user)} == {
        "report.ready",
        "subscription.activated",
    }
    async with deferred.sessions() as session:
        await set_choice(session, user, "reports", "email", False)
        await session.commit()
    [(deliver, _)] = await deferred.scheduled("deliver")
    await deferred.run(deliver)
    assert await deferred.emails(user) == []  # switched off meanwhile: not sent
    assert {(n.category, n.source.split(":")[0]) for n in deferred.other.delivered} == {
        ("reports", "report.ready"),
        ("billing", "subscription.activated"),
    }
    assert await deferred.held(user) == []
    assert end > datetime.now(UTC)


async def test_a_replay_holds_nothing_and_changed_quiet_hours_move_what_is_held(
    deferred: Deferred,
) -> None:
    user = await known_user(deferred)
    await quiet_until(deferred, user, 600)
    await deferred.handle(report_ready(user), replay=True)
    assert await deferred.held(user) == []
    assert len(await deferred.inbox(user)) == 1

    first_end = await quiet_until(deferred, user, 900)
    await deferred.handle(report_ready(user))
    [(first, _)] = await deferred.scheduled("deliver")
    # quiet hours moved later: the first job, when it runs, holds them again until the new end
    later = await quiet_until(deferred, user, 1800)
    assert later > first_end
    await deferred.run(first)
    assert {h.release_at for h in await deferred.held(user)} == {later}
    assert deferred.metrics.released.labels("email", "held_again")._value.get() == 1
    # quiet hours removed: what is held is due at once
    await quiet(deferred, user, "", "")
    jobs = await deferred.scheduled("deliver")
    assert len(jobs) == 3
    due = jobs[-1][1]
    assert due <= datetime.now(UTC)
    await deferred.run(jobs[-1][0])
    assert await deferred.held(user) == []
    assert [e["subject"] for e in await deferred.emails(user)] == ["Your report is ready"]


# -- through the app, on the broker --------------------------------------------------------------


@pytest.fixture
async def app(database_url: str, rabbitmq: Found) -> AsyncIterator[Restartable]:
    async with restartable(database_url, rabbitmq.url) as runner:
        yield runner


def is_job(event_type: str | None) -> bool:
    return event_type is not None and ".notification.job." in event_type


async def staged(runner: Restartable, subject: str) -> list[datetime]:
    """When each ``email.send`` with ``subject`` was staged."""
    async with runner.service.app.state.sessions() as session:
        rows = await session.exec(
            select(OutboxRow).where(col(OutboxRow.routing_key) == "email.send.v1")
        )
        return [r.created_at.replace(tzinfo=UTC) for r in rows.all() if subject.encode() in r.body]


def quiet_body(seconds: float, zone: str = "America/St_Johns") -> dict[str, Any]:
    """Quiet hours ending ``seconds`` from now, on the clock of ``zone`` (UTC-03:30/-02:30)."""
    now = datetime.now(ZoneInfo(zone))
    end = now + timedelta(seconds=seconds)
    return {"start": clock(now - timedelta(hours=2)), "end": clock(end), "time_zone": zone}


async def test_an_email_waits_for_the_end_of_quiet_hours_and_a_restart_loses_nothing(
    app: Restartable,
) -> None:
    service = app.service
    user = new_user()
    body = quiet_body(5)
    put = await service.client.put(f"/users/{user}/preferences", json={"quiet_hours": body})
    assert put.status_code == 200, put.text
    assert put.json()["quiet_hours"] == body
    report, urgent = report_ready(user), workspace_created(user)
    await service.deliver(user_created(user), report, urgent)
    shown = (await service.client.get(f"/users/{user}/notifications")).json()["items"]
    assert [n["category"] for n in shown] == ["account", "reports"]  # in-app at once
    async with service.app.state.sessions() as session:
        held = (await session.exec(select(HeldDelivery))).all()
    assert sorted(h.channel for h in held) == ["email", "webhook"]  # (the user has no endpoint)
    end = held[0].release_at
    assert end - datetime.now(UTC) < timedelta(seconds=6)

    assert len(await staged(app, "Your workspace is ready")) == 1  # urgent: never held
    assert await staged(app, "Your report is ready") == []
    await app.restart()  # a deploy during the wait
    service = app.service
    assert datetime.now(UTC) < end, "the restart took longer than the quiet hours"
    assert await staged(app, "Your report is ready") == []

    async def sent() -> bool:
        return len(await staged(app, "Your report is ready")) > 0

    await eventually(sent, timeout=20, what="the held report mail")
    [when] = await staged(app, "Your report is ready")
    assert when >= end.replace(tzinfo=UTC) - timedelta(milliseconds=1)
    commands = await service.commands(expect=2)
    assert sorted(c["subject"] for c in commands) == [
        "Your report is ready",
        "Your workspace is ready",
    ]
    recorded = [r for r in service.recorder.records if is_job(r.event_type)]
    assert [r.outcome for r in recorded] == ["processed"]
    async with service.app.state.sessions() as session:
        assert (await session.exec(select(func.count()).select_from(HeldDelivery))).one() == 0
    metrics = (await service.client.get("/metrics")).text
    assert (
        'tributary_notification_released_total{channel="email",outcome="delivered"} 1.0' in metrics
    )


async def test_an_email_switched_off_during_the_wait_is_not_sent(app: Restartable) -> None:
    service = app.service
    user = new_user()
    url = f"/users/{user}/preferences"
    refused = {
        "start": {"start": "7:00", "end": "08:00", "time_zone": "UTC"},
        "time_zone": {"start": "22:00", "end": "07:00", "time_zone": "Mars/Olympus_Mons"},
        "": {"start": "22:00", "end": "22:00:00", "time_zone": "UTC"},
        "when": {"start": "22:00", "end": "07:00", "time_zone": "UTC", "when": "always"},
    }
    for field, wrong in refused.items():
        answer = await service.client.put(url, json={"quiet_hours": wrong})
        assert answer.status_code == 422, answer.text
        [error] = answer.json()["errors"]
        assert error["field"] == f"body.quiet_hours.{field}".rstrip("."), error
    body = quiet_body(3, "Europe/Berlin")
    put = await service.client.put(url, json={"quiet_hours": body})
    assert put.json()["quiet_hours"] == body
    assert (await service.client.get(url)).json()["quiet_hours"] == body
    await service.deliver(user_created(user), report_ready(user))
    switched = {"categories": {"reports": {"email": False}}, "quiet_hours": body}
    put = await service.client.put(url, json=switched)
    assert put.json()["categories"]["reports"]["email"] is False
    assert put.json()["quiet_hours"] == body  # (a PUT replaces them too: sent again)

    async def delivered() -> bool:
        return any(is_job(r.event_type) for r in service.recorder.records)

    started = wall_time.monotonic()
    await eventually(delivered, timeout=20, what="the deliver job")
    assert wall_time.monotonic() - started < 15
    assert await staged(app, "Your report is ready") == []
    async with service.app.state.sessions() as session:
        assert (await session.exec(select(func.count()).select_from(HeldDelivery))).one() == 0
