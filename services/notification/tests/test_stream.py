"""The live stream through real uvicorn: push after commit, exactly once, resume, heartbeat,
shutdown, limits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlmodel import col, select

from tributary.messaging.db import create_engine, session_factory
from tributary.notification.models import Notification
from tributary.notification.streams import Streams
from tributary.testkit.infra import Found
from tributary.testkit.waiting import eventually

from .events import new_user, report_ready, user_created
from .harness import Service
from .sse import Served, served


@pytest.fixture
async def service(database_url: str, rabbitmq: Found) -> AsyncIterator[Served]:
    async with served(database_url, rabbitmq.url, NOTIFICATION_SSE_POLL_SECONDS=30) as running:
        yield running


@pytest.fixture
async def on_sqlite(sqlite_url: str, rabbitmq: Found) -> AsyncIterator[Served]:
    async with served(sqlite_url, rabbitmq.url, NOTIFICATION_SSE_POLL_SECONDS=30) as running:
        yield running


async def test_a_handled_event_is_pushed_at_once_and_exactly_once_however_redelivered(
    service: Served,
) -> None:
    user = new_user()
    await service.deliver(user_created(user))
    async with service.stream(user) as stream:
        hello = await stream.next()
        assert hello.comments == ["connected"]
        assert hello.retry == 3000
        report = report_ready(user, "Q3 revenue")
        await service.publish(report)
        # the poll interval is 30 s: only the wake-up after commit can bring it this soon
        pushed = await stream.next_event(timeout=10)
        assert (pushed.event, pushed.id) == ("notification", "1")
        assert pushed.json()["body"] == "Your report “Q3 revenue” is ready to download."
        assert pushed.json()["read_at"] is None

        await service.publish(report, times=3)
        await service.publish(report.model_copy(update={"id": f"{report.id}-again"}))
        await service.handled(report, times=4)
        await service.handled(report.model_copy(update={"id": f"{report.id}-again"}))
        following = report_ready(user, "Q4 revenue")
        await service.publish(following)
        after = await stream.next_event()
        assert after.id == "2"  # nothing about the first report came again in between
        assert "Q4" in after.json()["body"]
    await released(service, user)  # the subscription ends with the response


async def released(service: Served, user: str) -> None:
    streams: Streams = service.app.state.streams

    async def none_open() -> bool:
        return streams.count(user) == 0

    await eventually(none_open, timeout=10, what="the server to see the client go")


async def test_last_event_id_replays_what_came_after_it_from_the_database(
    on_sqlite: Served,
) -> None:
    service = on_sqlite
    user = new_user()
    await service.deliver(user_created(user), *(report_ready(user, f"r{n}") for n in range(3)))
    async with service.stream(user, headers={"Last-Event-ID": "1"}) as stream:
        assert [(await stream.next_event()).id for _ in range(2)] == ["2", "3"]
    async with service.stream(user, params={"after": 0}) as stream:
        assert [(await stream.next_event()).id for _ in range(3)] == ["1", "2", "3"]
    async with service.stream(user, params={"after": 0}, headers={"Last-Event-ID": "2"}) as stream:
        assert (await stream.next_event()).id == "3"  # the header wins: it is the newer
    async with service.stream(user) as stream:  # no position: from the next new one
        assert (await stream.next()).comments == ["connected"]
        await service.publish(report_ready(user, "new"))
        assert (await stream.next_event()).id == "4"

    for bad in (b"abc", b"-1", b"1.5", "٣".encode(), b"99999999999999999999"):
        headers = [(k.encode(), v.encode()) for k, v in service.tokens.member(user).items()]
        answer = await service.client.get(
            f"/users/{user}/notifications/stream", headers=[*headers, (b"Last-Event-ID", bad)]
        )
        assert answer.status_code == 422, bad
        assert answer.json()["errors"][0]["field"] == "header.Last-Event-ID"


async def test_an_idle_stream_sends_heartbeats(sqlite_url: str, rabbitmq: Found) -> None:
    async with served(sqlite_url, rabbitmq.url, NOTIFICATION_SSE_HEARTBEAT_SECONDS=0.2) as service:
        user = new_user()
        async with service.stream(user) as stream:
            assert (await stream.next()).comments == ["connected"]
            started = time.monotonic()
            beats = [await stream.next(timeout=5) for _ in range(3)]
            assert [b.comments for b in beats] == [["heartbeat"]] * 3
            assert time.monotonic() - started >= 0.4  # paced, not a burst


async def test_notifications_another_replica_commits_arrive_by_the_periodic_read(
    sqlite_url: str, rabbitmq: Found
) -> None:
    async with served(sqlite_url, rabbitmq.url, NOTIFICATION_SSE_POLL_SECONDS=0.2) as service:
        user = new_user()
        engine = create_engine(sqlite_url)
        try:
            replica = Service(session_factory(engine))  # its own process state: no wake-up here
            async with service.stream(user) as stream:
                assert (await stream.next()).comments == ["connected"]
                await replica.handle(user_created(user))
                await replica.handle(report_ready(user, "from elsewhere"))
                assert (await stream.next_event(timeout=5)).id == "1"
        finally:
            await engine.dispose()


async def test_shutdown_ends_every_stream_cleanly_before_the_server_waits_for_them(
    on_sqlite: Served,
) -> None:
    service = on_sqlite  # graceful timeout 30 s: a stream left open would hold shutdown
    users = [new_user(), new_user()]
    async with service.stream(users[0]) as first, service.stream(users[1]) as second:
        for stream in (first, second):
            assert (await stream.next()).comments == ["connected"]
        started = time.monotonic()
        assert service.server is not None
        service.server.should_exit = True
        for stream in (first, second):
            tail = await stream.rest(timeout=10)
            assert tail[-1].comments == ["closing"]
        await service.stop()
        assert time.monotonic() - started < 10
    assert service.app.state.streams.closed
    with pytest.raises(httpx.ConnectError):
        await service.client.get("/health/live")


async def test_limits_a_user_s_open_streams_and_ends_one_when_its_token_expires(
    sqlite_url: str, rabbitmq: Found
) -> None:
    async with served(sqlite_url, rabbitmq.url, NOTIFICATION_SSE_STREAMS_PER_USER=1) as service:
        user = new_user()
        async with service.stream(user) as stream:
            assert (await stream.next()).comments == ["connected"]
            refused = await service.client.get(
                f"/users/{user}/notifications/stream", headers=service.tokens.member(user)
            )
            assert refused.status_code == 429
            assert refused.headers["content-type"].startswith("application/problem+json")
        await released(service, user)

        short = service.tokens.token(user, {"notifications:read"}, ttl=1)
        async with service.stream(user, headers={"Authorization": f"Bearer {short}"}) as stream:
            tail = await stream.rest(timeout=10)
            assert tail[0].comments == ["connected"]
            assert tail[-1].comments == ["token expired"]


async def test_the_stream_reads_rows_and_never_holds_a_session(on_sqlite: Served) -> None:
    """Reads are short sessions: a stream left open does not pin a database connection."""
    service = on_sqlite
    user = new_user()
    await service.deliver(user_created(user), report_ready(user))
    async with service.stream(user, params={"after": 0}) as stream:
        assert (await stream.next_event()).id == "1"
        async with service.app.state.sessions() as session:
            rows = await session.exec(
                select(Notification.seq).where(col(Notification.user_id) == user)
            )
            assert rows.all() == [1]
        pool = service.app.state.engine.pool

        async def nothing_checked_out() -> bool:  # the relay's polls check out briefly
            return bool(pool.checkedout() == 0)

        await eventually(nothing_checked_out, timeout=5, what="no connection held by the stream")
