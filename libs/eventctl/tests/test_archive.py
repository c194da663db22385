"""The archive file: JSON lines that can be published again, appended to, never truncated."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from tributary.eventctl.archive import ArchiveFile, jsonable


def test_amqp_field_values_become_json() -> None:
    died = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = {
        "x-death": [{"time": died, "count": 2, "routing-keys": ["user.created.v2"]}],
        "rate": Decimal("1.5"),
        "raw": b"text",
        "binary": b"\xff\x00",
    }

    assert jsonable(headers) == {
        "x-death": [
            {"time": "2026-01-02T03:04:05+00:00", "count": 2, "routing-keys": ["user.created.v2"]}
        ],
        "rate": "1.5",
        "raw": "text",
        "binary": {"base64": "/wA="},
    }


def test_an_archive_file_is_created_on_first_write_and_appended_to_after(tmp_path: Path) -> None:
    path = tmp_path / "archive" / "probe.jsonl"
    first = ArchiveFile(path)
    first.write([])
    assert not path.exists()  # nothing selected: no file

    first.write([{"message_id": "a"}])
    first.close()
    second = ArchiveFile(path)
    second.write([{"message_id": "b"}, {"message_id": "c"}])
    second.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == ["a", "b", "c"]
