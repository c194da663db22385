"""``eventctl dlq`` by time window and correlation id, with the progress bar and --rate.

The DLQ copies are written directly (the headers the runtime writes when it dead-letters,
with chosen times), into plain queues of a fresh prefix: no service runs, the tests are fast.
The property tests drive the parsing of the time arguments and of the headers (foreign input).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from tributary.eventctl import progress
from tributary.eventctl.commands import dlq_time
from tributary.eventctl.entries import DlqEntry, Selector, parse_instant
from tributary.eventctl.progress import EXIT_INTERRUPTED
from tributary.messaging import headers as h
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import queue_depth
from tributary.testkit.waiting import eventually

from .helpers import eventctl, listed, messages_in

SERVICE = "probe"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# -- parsing (no broker) ----------------------------------------------------------------------


def test_times_are_iso_8601_and_utc_without_an_offset() -> None:
    assert dlq_time("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert dlq_time("2026-03-01T12:00:00Z") == T0
    assert dlq_time("2026-03-01T14:00:00+02:00") == T0
    assert dlq_time("2026-03-01T12:00:00.123Z") == T0 + timedelta(milliseconds=123)
    for bad in ("yesterday", "", "2026-13-01", "12:00", "2026-03-01T25:00"):
        with pytest.raises(argparse.ArgumentTypeError, match="not an ISO 8601 time"):
            dlq_time(bad)


@given(st.text(max_size=80))
def test_any_time_argument_is_a_utc_time_or_a_usage_error(value: str) -> None:
    try:
        moment = dlq_time(value)
    except argparse.ArgumentTypeError as exc:
        message = str(exc)
        assert message.startswith("not an ISO 8601 time")
        return
    assert moment.utcoffset() == timedelta(0)


@given(st.datetimes(timezones=st.timezones() | st.none()))
def test_every_iso_time_reads_back_as_the_same_instant(moment: datetime) -> None:
    parsed = parse_instant(moment.isoformat())
    if moment.tzinfo is None:
        assert parsed == moment.replace(tzinfo=UTC)
        return
    try:
        # compared in UTC: aware times in a zone's gap or fold never equal another zone's
        expected = moment.astimezone(UTC)
    except OverflowError:  # the UTC instant falls outside datetime's range
        assert parsed is None
        return
    assert parsed == expected


header_values = st.one_of(
    st.none(),
    st.text(max_size=70),
    st.binary(max_size=40),
    st.integers(),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.lists(st.integers(), max_size=3),
)


@given(
    last_failure=header_values,
    correlation_id=st.none() | st.text(max_size=20),
    since=st.none() | st.datetimes(timezones=st.just(UTC)),
    until=st.none() | st.datetimes(timezones=st.just(UTC)),
    wanted=st.lists(st.text(max_size=20), max_size=3),
)
def test_any_dlq_headers_match_or_not_never_raise(
    last_failure: Any,
    correlation_id: str | None,
    since: datetime | None,
    until: datetime | None,
    wanted: list[str],
) -> None:
    entry = DlqEntry(
        message_id="m",
        type=None,
        reason=None,
        consumer=None,
        attempts=None,
        first_failure=None,
        last_failure=last_failure,
        routing_key=None,
        error=None,
        correlation_id=correlation_id,
    )
    selector = Selector.of(since=since, until=until, correlation_ids=wanted)
    matched = selector.matches(entry)

    at = entry.dead_lettered_at
    if matched and (since or until):
        assert at is not None
        assert since is None or at >= since
        assert until is None or at < until
    if matched and wanted:
        assert correlation_id in wanted
    if not wanted and not since and not until:
        assert matched


# -- against the broker -----------------------------------------------------------------------


@dataclass
class Dlq:
    settings: MessagingSettings
    channel: aio_pika.abc.AbstractChannel

    @property
    def dlq(self) -> str:
        return f"{self.settings.name_prefix}{SERVICE}.dlq"

    @property
    def work(self) -> str:
        return f"{self.settings.name_prefix}{SERVICE}.events"

    async def put(self, at: datetime | None, correlation_id: str, **headers: Any) -> str:
        """A DLQ copy as the runtime writes it, dead-lettered at ``at``."""
        message_id = str(uuid.uuid4())
        values: dict[str, Any] = {
            h.REASON: "handler_error",
            h.CONSUMER: SERVICE,
            h.ATTEMPTS: 3,
            h.ROUTING_KEY: "user.created.v2",
            **headers,
        }
        if at is not None:
            values[h.FIRST_FAILURE] = h.iso(at - timedelta(seconds=5))
            values[h.LAST_FAILURE] = h.iso(at)
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"id": message_id}).encode(),
                message_id=message_id,
                correlation_id=correlation_id,
                type="com.tributary.user.created.v2",
                headers=values,
            ),
            routing_key=self.dlq,
        )
        return message_id


@pytest.fixture
async def dlq(settings: MessagingSettings) -> AsyncIterator[Dlq]:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        box = Dlq(settings, channel)
        await channel.declare_queue(box.dlq)
        await channel.declare_queue(box.work)
        try:
            yield box
        finally:
            await channel.queue_delete(box.dlq)
            await channel.queue_delete(box.work)


async def ids_in(dlq: Dlq, capsys: pytest.CaptureFixture[str], *filters: str) -> set[str]:
    capsys.readouterr()
    assert await eventctl(dlq.settings, "dlq", "list", SERVICE, "--json", *filters) == 0
    return {row["message_id"] for row in listed(capsys)}


@pytest.mark.broker
async def test_list_by_time_window_and_correlation_id(
    dlq: Dlq, capsys: pytest.CaptureFixture[str]
) -> None:
    early = await dlq.put(T0 - timedelta(hours=2), "c-early")
    inside = await dlq.put(T0, "c-1")
    inside_too = await dlq.put(T0 + timedelta(minutes=59, seconds=59), "c-2")
    late = await dlq.put(T0 + timedelta(hours=1), "c-1")  # --until is exclusive
    no_time = await dlq.put(None, "c-1")
    everything = {early, inside, inside_too, late, no_time}

    assert await ids_in(dlq, capsys) == everything
    window = ("--since", "2026-03-01T12:00:00Z", "--until", "2026-03-01T14:00:00+01:00")
    assert await ids_in(dlq, capsys, *window) == {inside, inside_too}
    assert await ids_in(dlq, capsys, "--since", "2026-03-01T12:30") == {inside_too, late}
    assert await ids_in(dlq, capsys, "--until", "2026-03-01T11:00") == {early}
    assert await ids_in(dlq, capsys, "--correlation-id", "c-1") == {inside, late, no_time}
    assert await ids_in(dlq, capsys, "--correlation-id", "c-1", "c-2", *window) == {
        inside,
        inside_too,
    }
    # listing removes nothing
    assert await messages_in(dlq.settings.rabbitmq_url, dlq.dlq) == len(everything)


@pytest.mark.broker
async def test_the_broker_dead_letter_time_counts_when_the_runtime_wrote_none(
    dlq: Dlq, capsys: pytest.CaptureFixture[str]
) -> None:
    by_broker = await dlq.put(
        None, "c-x", **{"x-death": [{"reason": "delivery_limit", "time": T0, "count": 1}]}
    )
    assert await ids_in(dlq, capsys, "--since", "2026-03-01T11:59:59Z") == {by_broker}
    assert await ids_in(dlq, capsys, "--since", "2026-03-01T12:00:01Z") == set()


@pytest.mark.broker
async def test_a_bad_time_is_a_usage_error(dlq: Dlq, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        await eventctl(dlq.settings, "dlq", "list", SERVICE, "--since", "last tuesday")
    assert exit_.value.code == 2
    assert "not an ISO 8601 time" in capsys.readouterr().err


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """What the progress bar draws, as on a terminal."""
    out = io.StringIO()
    monkeypatch.setattr(
        progress, "stderr_console", lambda: Console(file=out, force_terminal=True, width=160)
    )
    return out


@pytest.mark.broker
async def test_replay_of_a_window_with_a_bar_and_a_rate(
    dlq: Dlq, capsys: pytest.CaptureFixture[str], drawn: io.StringIO
) -> None:
    selected = {await dlq.put(T0 + timedelta(seconds=i), f"c-{i}") for i in range(6)}
    outside = await dlq.put(T0 - timedelta(days=1), "c-old")
    capsys.readouterr()

    code = await eventctl(
        dlq.settings, "dlq", "replay", SERVICE, "--since", "2026-03-01T12:00Z", "--rate", "500"
    )

    assert code == 0
    out = capsys.readouterr().out
    assert "selected 6, republished 6" in out
    assert "skipped 1 (left in the DLQ)" in out
    bar = drawn.getvalue()
    assert f"replay {dlq.dlq}" in bar
    assert "7/7" in bar  # every message read, the skipped one included
    assert "msg/s" in bar
    assert "ETA" in bar
    assert await ids_in(dlq, capsys) == {outside}
    assert await messages_in(dlq.settings.rabbitmq_url, dlq.work) == len(selected)


@pytest.mark.broker
async def test_archive_by_correlation_id_with_a_bar(
    dlq: Dlq, capsys: pytest.CaptureFixture[str], drawn: io.StringIO, tmp_path: Path
) -> None:
    wanted = [await dlq.put(T0, "request-1") for _ in range(3)]
    other = await dlq.put(T0, "request-2")
    archive = tmp_path / "dlq.jsonl"
    capsys.readouterr()

    code = await eventctl(
        dlq.settings,
        "dlq",
        "archive",
        SERVICE,
        "--to",
        str(archive),
        "--correlation-id",
        "request-1",
        "--batch",
        "2",
    )

    assert code == 0
    assert "archived 3" in capsys.readouterr().out
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert sorted(line["message_id"] for line in lines) == sorted(wanted)
    assert f"archive {dlq.dlq}" in drawn.getvalue()
    assert "4/4" in drawn.getvalue()
    assert await ids_in(dlq, capsys) == {other}


@pytest.mark.broker
async def test_no_progress_draws_nothing(
    dlq: Dlq, capsys: pytest.CaptureFixture[str], drawn: io.StringIO
) -> None:
    await dlq.put(T0, "c")
    code = await eventctl(dlq.settings, "dlq", "replay", SERVICE, "--no-progress")
    assert code == 0
    assert drawn.getvalue() == ""


async def take_ids(url: str, queue: str) -> list[str]:
    """Every message id in ``queue`` (read and removed)."""
    ids: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            ids.append(str(message.message_id))
    return ids


@pytest.mark.broker
async def test_ctrl_c_mid_replay_stops_between_confirms_and_prints_the_counts(
    dlq: Dlq,
) -> None:
    """A real ``eventctl`` process sent SIGINT while it replays 300 messages: each message
    is either still in the DLQ or in the work queue exactly once, as many as it printed."""
    everything = set()
    for i in range(300):
        everything.add(await dlq.put(T0 + timedelta(milliseconds=i), f"c-{i}"))
    url = dlq.settings.rabbitmq_url
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRIBUTARY_BROKER_USER_PREFIX": ""}
    argv = [sys.executable, "-m", "tributary.eventctl", "dlq", "replay", SERVICE]
    argv += ["--url", url, "--prefix", dlq.settings.name_prefix, "--rate", "150", "--batch", "20"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:

        async def under_way() -> bool:
            return await queue_depth(url, dlq.work) >= 40

        await eventually(under_way, timeout=30, what="the replay under way")
        proc.send_signal(signal.SIGINT)
        raw_out, raw_err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = raw_out.decode(), raw_err.decode()

    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "interrupted" in err  # the notice when Ctrl-C came
    assert out.startswith("interrupted (Ctrl-C)"), out
    republished = int(out.split("republished ", 1)[1].split(",", 1)[0])
    assert 40 <= republished < 300, out
    assert "failed 0" in out

    replayed = await take_ids(url, dlq.work)
    left = await take_ids(url, dlq.dlq)
    assert len(replayed) == len(set(replayed)) == republished  # each replayed exactly once
    assert set(replayed).isdisjoint(left)
    assert set(replayed) | set(left) == everything
    assert len(left) == 300 - republished


@pytest.mark.broker
async def test_ctrl_c_mid_archive_keeps_every_message_in_the_file_or_the_dlq(
    dlq: Dlq, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    everything = {await dlq.put(T0, f"c-{i}") for i in range(200)}
    archive = tmp_path / "dlq.jsonl"

    async def press_ctrl_c() -> None:
        async def under_way() -> bool:
            return archive.exists() and archive.read_text().count("\n") >= 20

        await eventually(under_way, timeout=20, what="the archive under way")
        os.kill(os.getpid(), signal.SIGINT)

    pressing = asyncio.create_task(press_ctrl_c())
    capsys.readouterr()
    code = await eventctl(
        dlq.settings, "dlq", "archive", SERVICE, "--to", str(archive), "--rate", "200",
        "--batch", "10",
    )  # fmt: skip
    await pressing

    out = capsys.readouterr().out
    assert code == EXIT_INTERRUPTED
    assert out.startswith("interrupted (Ctrl-C)")
    archived = int(out.split("archived ", 1)[1].split(",", 1)[0])
    assert 20 <= archived < 200
    written = [json.loads(line)["message_id"] for line in archive.read_text().splitlines()]
    left = await take_ids(dlq.settings.rabbitmq_url, dlq.dlq)
    assert len(written) == len(set(written)) == archived
    assert set(written).isdisjoint(left)
    assert set(written) | set(left) == everything
