"""Command-line surface of the dlq and replay commands: names, defaults, help, validation."""

from __future__ import annotations

from datetime import datetime

import pytest

from tributary.eventctl.broker import broker_options, queues_for, redact
from tributary.eventctl.cli import build_parser, main
from tributary.eventctl.replay import parse_time


def test_a_service_name_maps_to_its_work_queue_and_dlq() -> None:
    queues = queues_for("onboarding", "t1.")

    assert (queues.work, queues.dlq) == ("t1.onboarding.events", "t1.onboarding.dlq")
    assert queues_for("onboarding.dlq", "") == queues_for("onboarding", "")


def test_a_command_name_maps_to_the_command_queue() -> None:
    queues = queues_for("email.send", "")

    assert (queues.work, queues.dlq) == ("email.send", "email.send.dlq")


def test_broker_options_come_from_the_environment_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://ops:secret@broker:5672/")
    monkeypatch.setenv("TRIBUTARY_NAME_PREFIX", "staging.")

    assert broker_options(None, None).url == "amqp://ops:secret@broker:5672/"
    assert broker_options(None, None).prefix == "staging."
    assert broker_options("amqp://localhost/", "").prefix == ""


def test_a_broker_url_is_shown_without_its_password() -> None:
    assert redact("amqp://ops:secret@broker:5672/") == "amqp://ops:***@broker:5672/"
    assert redact("amqp://broker/") == "amqp://broker/"


def test_times_are_read_as_utc() -> None:
    assert parse_time("2026-01-01T10:00:00+02:00") == datetime(2026, 1, 1, 8, 0)
    assert parse_time("2026-01-01T10:00:00Z") == datetime(2026, 1, 1, 10, 0)
    assert parse_time("2026-01-01") == datetime(2026, 1, 1)


def test_the_outbox_replay_help_warns_that_the_inbox_reports_duplicates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["replay", "outbox", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "events it has already processed are acknowledged as duplicates" in help_text
    assert "x-tributary-replay: 1" in help_text


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "replay", "probe", "--batch", "0"],
        ["dlq", "archive", "probe"],  # --to is required
        ["replay", "outbox", "--database", "sqlite:///x.db", "--type", "user.created"],
        ["replay", "outbox", "--database", "d", "--type", "t", "--to-service", "s", "--from", "x"],
    ],
)
def test_incomplete_or_invalid_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)

    assert exit_info.value.code == 2
