"""``eventctl erase``: every DLQ and the archive files lose the records about one person."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tributary.contracts.events import UserCreatedV2
from tributary.eventctl.erase import (
    NotAnArchive,
    archive_files,
    dead_letter_owners,
    rewrite_archive,
)
from tributary.messaging import PermanentError
from tributary.messaging.bus import Bus
from tributary.messaging.erasure import PersonMatcher
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.testing import OutcomeRecorder, started_bus

from .helpers import Handler, eventctl, messages_in, publish, user_created

PERSON = "usr_erase0123456789"
ADDRESS = "zelda.q@example.com"


def record(body: dict[str, Any] | bytes, *, headers: dict[str, Any] | None = None) -> str:
    """One archive line, shaped as ``eventctl dlq archive`` writes it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    line = {
        "archived_at": "2026-01-01T00:00:00.000Z",
        "queue": "onboarding.dlq",
        "message_id": "m",
        "type": "com.tributary.user.created.v2",
        "reason": "handler_error",
        "error": "PermanentError: no",
        "properties": {"type": "com.tributary.user.created.v2", "message_id": "m"},
        "headers": headers or {},
        "body_base64": base64.b64encode(raw).decode(),
    }
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"


def about(user_id: str, email: str) -> dict[str, Any]:
    return {"type": "com.tributary.user.created.v2", "data": {"user_id": user_id, "email": email}}


def test_only_the_records_about_the_person_go_and_the_rest_stay_byte_for_byte(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dlq.jsonl"
    keep = [
        record(about("usr_other00000001", "o@example.com")),
        "\n",
        record(b"\xff binary", headers={"x": {"base64": base64.b64encode(b"\xfe").decode()}}),
        record(
            {"type": "com.tributary.user.erased.v1", "data": {"user_id": PERSON}},
            headers={"x-tributary-routing-key": "user.erased.v1"},
        ),
        record(about("usr_other00000002", "b" + ADDRESS)),  # someone else's address
    ]
    drop = [
        record(about(PERSON, "z@example.com")),
        record(about("usr_other00000003", ADDRESS.upper())),  # the address, in the body only
        record(b"not json", headers={"x-tributary-error": f"unknown user {PERSON}"}),
        record(b"x", headers={"raw": {"base64": base64.b64encode(ADDRESS.encode()).decode()}}),
    ]
    path.write_text("".join([keep[0], drop[0], keep[1], drop[1], *keep[2:], *drop[2:]]))
    path.chmod(0o640)
    matcher = PersonMatcher(PERSON, also=[ADDRESS])

    dry = rewrite_archive(path, matcher, dry_run=True)
    assert (dry.records, dry.removed) == (8, 4)
    assert len(path.read_text().splitlines()) == 9

    result = rewrite_archive(path, matcher, dry_run=False)

    assert (result.records, result.removed) == (8, 4)
    assert path.read_text() == "".join(keep)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["dlq.jsonl"]  # no temporary file left
    again = rewrite_archive(path, matcher, dry_run=False)
    assert again.removed == 0


def test_a_file_that_is_not_an_archive_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text(f"call {ADDRESS}\n")
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\xff\xd8\xff")
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    for path in (notes, binary):
        before = path.read_bytes()
        with pytest.raises(NotAnArchive):
            rewrite_archive(path, matcher, dry_run=False)
        assert path.read_bytes() == before


def test_directories_are_searched_for_files_hidden_ones_left_out(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.jsonl").write_text("")
    (tmp_path / "two.jsonl").write_text("")
    (tmp_path / ".two.jsonl.x.erasing").write_text("")
    assert archive_files([tmp_path, tmp_path / "two.jsonl"]) == [
        tmp_path / "a" / "one.jsonl",
        tmp_path / "two.jsonl",
    ]
    with pytest.raises(FileNotFoundError):
        archive_files([tmp_path / "missing"])


def test_every_service_and_command_queue_of_the_catalog_is_swept() -> None:
    owners = dead_letter_owners()
    assert {"identity", "onboarding", "email", "audit", "notification", "email.send"} <= set(owners)


_LINES = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=60).map(
        lambda t: t.replace("\n", " ").replace("\r", " ") + "\n"
    ),
    st.binary(max_size=40).map(record),
    st.sampled_from([record(about(PERSON, "p@x.org")), record(about("usr_someone00001", ADDRESS))]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(_LINES, max_size=8))
def test_any_file_is_either_refused_untouched_or_left_without_the_person(
    tmp_path: Path, lines: list[str]
) -> None:
    path = tmp_path / "fuzz.jsonl"
    content = "".join(lines).encode()
    path.write_bytes(content)
    matcher = PersonMatcher(PERSON, also=[ADDRESS])
    try:
        result = rewrite_archive(path, matcher, dry_run=False)
    except NotAnArchive:
        assert path.read_bytes() == content
        return
    left = path.read_bytes().decode()
    assert left.count("\n") == len(lines) - result.removed
    assert not matcher.in_text(left)
    path.unlink()


# -- the command, against the real broker --------------------------------------------------------


@pytest.fixture
async def onboarding(
    consumer_engine: AsyncEngine, settings: MessagingSettings
) -> AsyncIterator[tuple[Bus, OutcomeRecorder]]:
    """A service named onboarding (under the test's prefix) that dead-letters every sign-up."""
    handler = Handler(failure=PermanentError("refused"))
    bus = Bus("onboarding", consumer_engine, handlers={UserCreatedV2: handler}, settings=settings)
    async with started_bus(bus) as outcomes:
        yield bus, outcomes


@pytest.mark.broker
async def test_erase_sweeps_every_dlq_and_rewrites_the_archives(
    onboarding: tuple[Bus, OutcomeRecorder],
    settings: MessagingSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bus, outcomes = onboarding
    mine = [user_created(user_id=PERSON), user_created(email=ADDRESS)]
    others = [user_created(user_id=f"usr_other{n:010d}", email=f"o{n}@x.org") for n in range(3)]
    for event in [*mine, *others]:
        await publish(settings, event)
    for event in [*mine, *others]:
        await outcomes.wait_until_handled(event["id"], "dead_lettered")
    archive = tmp_path / "archives" / "onboarding.jsonl"
    ids = [mine[0]["id"], others[0]["id"]]
    assert (
        await eventctl(settings, "dlq", "archive", "onboarding", "--to", str(archive), "--id", *ids)
        == 0
    )
    dlq = bus.names.service_queues("onboarding", 0).dlq
    assert await messages_in(settings.rabbitmq_url, dlq) == 3
    capsys.readouterr()

    argv = ["erase", "--user", PERSON, "--also", ADDRESS, "--archive", str(tmp_path / "archives")]
    assert await eventctl(settings, *argv, "--dry-run") == 0
    dry = capsys.readouterr().out
    assert f"erase {dlq}: scanned 3, removed 1, kept 2 (dry run" in dry
    assert "removed 1, kept 1 (dry run" in dry
    assert await messages_in(settings.rabbitmq_url, dlq) == 3

    assert await eventctl(settings, *argv) == 0
    out = capsys.readouterr().out
    assert f"erase {dlq}: scanned 3, removed 1, kept 2" in out
    assert f"erase {settings.name_prefix}notification.dlq: no such queue (skipped)" in out
    assert f"erase archive {archive}: 2 record(s), removed 1, kept 1" in out
    lines = archive.read_text().splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == [others[0]["id"]]
    assert await messages_in(settings.rabbitmq_url, dlq) == 2
    capsys.readouterr()
    assert await eventctl(settings, "dlq", "list", "onboarding", "--json") == 0
    listed = {json.loads(line)["message_id"] for line in capsys.readouterr().out.splitlines()}
    assert listed == {others[1]["id"], others[2]["id"]}


@pytest.mark.broker
async def test_a_file_that_is_not_an_archive_but_mentions_the_person_fails_the_command(
    settings: MessagingSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text(f"call {ADDRESS}\n")
    (tmp_path / "other.txt").write_text("nothing about anyone\n")
    argv = ["erase", "--user", PERSON, "--also", ADDRESS, "--archive", str(tmp_path)]
    assert await eventctl(settings, *argv) == 1
    out = capsys.readouterr()
    assert "notes.txt" in out.err
    assert "mentions the person" in out.err
    assert "other.txt: line 1 is not JSON (not changed)" in out.out
    assert (tmp_path / "notes.txt").read_text() == f"call {ADDRESS}\n"


async def test_erase_refuses_what_is_not_a_user_id_or_too_short(
    settings: MessagingSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await eventctl(settings, "erase", "--user", "usr_") == 2
    assert await eventctl(settings, "erase", "--user", PERSON, "--also", "Al") == 2
    err = capsys.readouterr().err
    assert "--user must be a user id" in err
    assert "at least 6" in err
