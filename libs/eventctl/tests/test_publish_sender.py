"""``eventctl publish`` as a foreign producer and as the operator, on a broker provisioned from
the catalog (its own vhost and users) with a consumer whose sender check is on.

The consumer (notification, consuming comment.mentioned) processes what the catalog lets the
publisher send; what it does not is refused by eventctl before anything reaches the broker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from libs.contracts.tests.samples import sample
from tributary.contracts.events import CommentMentionedV1
from tributary.eventctl.cli import main_async

from .test_sender_check import Handled, engine, run_service, url_of, vhost

__all__ = ["engine", "run_service", "url_of", "vhost"]  # the fixtures this module uses

pytestmark = pytest.mark.broker


def publish_argv(url: str, vhost: str, data: Path, *extra: str) -> list[str]:
    return [
        "publish",
        "--type",
        "comment.mentioned",
        "--data",
        str(data),
        "--url",
        url,
        "--prefix",
        "",
        "--user-prefix",
        f"{vhost}.",
        *extra,
    ]


async def test_a_foreign_producer_and_the_operator_for_it_pass_the_sender_check(
    vhost: str,
    url_of: Callable[[str], str],
    run_service: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "mention.json"
    data.write_text(json.dumps(sample("comment.mentioned.v1")))
    handled = Handled()
    async with run_service("notification", {CommentMentionedV1: handled}) as (_bus, outcomes):
        # as comments-app's own broker user
        argv = publish_argv(url_of("comments-app"), vhost, data, "--id", "from-producer")
        assert await main_async(argv) == 0
        assert "as comments-app: confirmed" in capsys.readouterr().out
        await outcomes.wait_until_handled("from-producer")

        # as the operator, naming the producer
        argv = publish_argv(url_of("eventctl"), vhost, data, "--id", "from-operator")
        assert await main_async([*argv, "--producer", "comments-app"]) == 0
        await outcomes.wait_until_handled("from-operator")

        assert sorted(handled.ids) == ["from-operator", "from-producer"]


async def test_a_producer_the_catalog_does_not_allow_publishes_nothing(
    vhost: str,
    url_of: Callable[[str], str],
    run_service: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "mention.json"
    data.write_text(json.dumps(sample("comment.mentioned.v1")))
    handled = Handled()
    async with run_service("notification", {CommentMentionedV1: handled}) as (_bus, outcomes):
        # reports-app's user may not publish comment.mentioned
        assert await main_async(publish_argv(url_of("reports-app"), vhost, data)) == 2
        assert "reports-app may not publish comment.mentioned" in capsys.readouterr().err
        # nor may the operator publish it for reports-app, or without naming a producer
        operator = publish_argv(url_of("eventctl"), vhost, data)
        assert await main_async([*operator, "--producer", "reports-app"]) == 2
        assert await main_async(operator) == 2
        assert "--producer" in capsys.readouterr().err
        # a real one afterwards is the only event the consumer sees
        argv = publish_argv(url_of("comments-app"), vhost, data, "--id", "the-real-one")
        assert await main_async(argv) == 0
        await outcomes.wait_until_handled("the-real-one")
        assert handled.ids == ["the-real-one"]
        assert outcomes.of("the-real-one")[0].outcome == "processed"
