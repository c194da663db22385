"""Counts every command prints, and the DLQ listing as a table or JSON lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from tributary.eventctl.entries import DlqEntry


@dataclass
class Counts:
    """What a command did; ``duplicate`` is None when the command cannot know."""

    scanned: int = 0
    selected: int = 0
    republished: int = 0
    archived: int = 0
    duplicate: int | None = 0
    skipped: int = 0
    failed: int = 0
    unacked: int = 0
    """Republished or archived, but the DLQ copy could not be removed (it is still there)."""
    interrupted: bool = False
    """Stopped by Ctrl-C: what was in flight finished, the rest was not started."""


def _interrupted(counts: Counts, line: str) -> str:
    return f"interrupted (Ctrl-C), the rest left as it was: {line}" if counts.interrupted else line


def dlq_summary(action: str, source: str, target: str | None, counts: Counts, **flags: bool) -> str:
    """``replay t.probe.dlq -> t.probe.events: scanned 3 of 3, selected 2, republished 2, …``."""
    moved = "archived" if action == "archive" else "republished"
    parts = [f"scanned {counts.scanned}", f"selected {counts.selected}"]
    if action != "list":
        done = counts.archived if action == "archive" else counts.republished
        parts.append(f"{moved} {done}")
        if flags.get("dry_run"):
            would = counts.selected - (counts.duplicate or 0)
            parts[-1] += f" (dry run: would have {moved} {would})"
        if counts.duplicate is not None:
            parts.append(f"duplicate {counts.duplicate}")
        parts.append(f"failed {counts.failed}")
    parts.append(f"skipped {counts.skipped} (left in the DLQ)")
    if counts.unacked:
        parts.append(f"{counts.unacked} {moved} but still in the DLQ (harmless to repeat)")
    arrow = f" -> {target}" if target else ""
    return _interrupted(counts, f"{action} {source}{arrow}: " + ", ".join(parts))


def outbox_summary(types: Sequence[str], target: str, counts: Counts, *, dry_run: bool) -> str:
    republished = f"republished {counts.republished}"
    if dry_run:
        republished += f" (dry run: would have republished {counts.selected})"
    return _interrupted(
        counts,
        f"replay outbox {','.join(types)} -> {target}: "
        f"selected {counts.selected}, {republished}, "
        "duplicate unknown (the consumer's inbox counts already-processed events as duplicates), "
        f"failed {counts.failed}, "
        f"skipped {counts.skipped} (not yet published: the relay delivers them, or parked: "
        "see eventctl outbox parked)",
    )


_COLUMNS = (
    ("MESSAGE ID", "message_id"),
    ("TYPE", "type"),
    ("REASON", "reason"),
    ("CONSUMER", "consumer"),
    ("ATTEMPTS", "attempts"),
    ("FIRST FAILURE", "first_failure"),
    ("LAST FAILURE", "last_failure"),
    ("ROUTING KEY", "routing_key"),
    ("ERROR", "error"),
)


def table(entries: Sequence[DlqEntry]) -> list[str]:
    """Aligned columns, the error last and never cut."""
    rows = [[title for title, _ in _COLUMNS]]
    for entry in entries:
        values = entry.as_dict()
        rows.append(["-" if values[key] is None else str(values[key]) for _, key in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def json_lines(queue: str, entries: Sequence[DlqEntry]) -> list[str]:
    return [json.dumps({"queue": queue, **e.as_dict()}, ensure_ascii=False) for e in entries]
