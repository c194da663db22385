"""The DLQ archive: JSON lines (body base64, properties, headers), on disk before the ack."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from aio_pika.abc import AbstractIncomingMessage

from tributary.eventctl.entries import DlqEntry
from tributary.messaging.headers import now_iso


def jsonable(value: Any) -> Any:
    """AMQP field values (tables, arrays, timestamps, bytes) as JSON values."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return value


def record(queue: str, message: AbstractIncomingMessage) -> dict[str, Any]:
    """One archive line: what ``dlq list`` shows, then everything needed to publish it again."""
    return {
        "archived_at": now_iso(),
        "queue": queue,
        **DlqEntry.of(message).as_dict(),
        "properties": jsonable(
            {
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
                "delivery_mode": int(message.delivery_mode),
                "priority": message.priority,
                "correlation_id": message.correlation_id,
                "reply_to": message.reply_to,
                "message_id": message.message_id,
                "timestamp": message.timestamp,
                "type": message.type,
                "user_id": message.user_id,
                "app_id": message.app_id,
            }
        ),
        "headers": jsonable(dict(message.headers or {})),
        "body_base64": base64.b64encode(message.body).decode(),
    }


class ArchiveFile:
    """Appends records to ``path`` (never truncates it); :meth:`write` returns once fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO | None = None

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        fh = self._open()
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

    def _open(self) -> TextIO:
        if self._fh is None:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
            if created:  # the new directory entry must survive a crash as well
                _fsync_dir(self.path.parent)
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
