"""``eventctl erase``: remove one person from every DLQ and from DLQ archive files.

The services erase a person from their databases, outboxes and their own DLQs when they handle
``user.erased``. Two places stay outside them: the DLQs as they are after the services' sweeps
(a message about the person that failed later), and the archive files ``eventctl dlq archive``
wrote -- operator copies the services never see. This command sweeps every DLQ the catalog
implies with the same function the services use, and rewrites archive files without the
records about the person: each file is written anew beside the old one, fsynced, then renamed
over it, so a crash leaves the old file or the new one, never half of each.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractConnection

from tributary.contracts.catalog import catalog
from tributary.eventctl.broker import HeldReader, QueueMissing, broker_options, queues_for
from tributary.eventctl.commands import (
    EXIT_ERROR,
    EXIT_INCOMPLETE,
    EXIT_OK,
    _broker_arguments,
    _connected,
    _guarded,
)
from tributary.messaging.erasure import (
    DeadLetterQueueMissing,
    PersonMatcher,
    SweepCounts,
    is_erasure_message,
    is_erasure_type,
    sweep_queue,
)
from tributary.messaging.errors import InfrastructureError
from tributary.messaging.publisher import Publisher

USER_ID = re.compile(r"usr_[A-Za-z0-9]{8,40}")


def dead_letter_owners() -> list[str]:
    """Every service and command queue that has (or will have) a DLQ, from the catalog."""
    names: set[str] = set()
    for spec in catalog():
        if spec.kind == "command":
            names.add(spec.name)
        else:
            names.update(spec.consumers)
    return sorted(names)


# -- archive files ----------------------------------------------------------------------------


class NotAnArchive(ValueError):
    """A file that is not JSON lines of DLQ records: left as it is."""


@dataclass
class ArchiveResult:
    path: Path
    records: int = 0
    removed: int = 0


def _decoded(value: Any) -> Iterator[bytes]:
    """Byte values hidden in a record: ``{"base64": …}`` header values, at any depth."""
    if isinstance(value, Mapping):
        if set(value) == {"base64"} and isinstance(value["base64"], str):
            try:
                yield base64.b64decode(value["base64"], validate=True)
            except (binascii.Error, ValueError):
                return
            return
        for item in value.values():
            yield from _decoded(item)
    elif isinstance(value, list):
        for item in value:
            yield from _decoded(item)


def _is_erasure_record(record: Mapping[str, Any]) -> bool:
    properties = record.get("properties")
    headers = record.get("headers")
    candidates = [record.get("type"), record.get("routing_key")]
    if isinstance(properties, Mapping):
        candidates.append(properties.get("type"))
    if isinstance(headers, Mapping):
        candidates.append(headers.get("x-tributary-routing-key"))
    return any(isinstance(c, str) and is_erasure_type(c) for c in candidates)


def record_mentions(line: str, record: Mapping[str, Any], matcher: PersonMatcher) -> bool:
    """Whether an archive record is about the person: its text (what ``dlq list`` shows,
    properties, headers) or its body, or any byte value among its headers."""
    if _is_erasure_record(record):
        return False
    if matcher.in_text(line):
        return True
    body = record.get("body_base64")
    if isinstance(body, str):
        try:
            if matcher.in_bytes(base64.b64decode(body, validate=True)):
                return True
        except (binascii.Error, ValueError):
            pass
    return any(matcher.in_bytes(raw) for raw in _decoded(record.get("headers")))


def _parse(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """The file's lines with their record (None for a blank line); :class:`NotAnArchive`."""
    parsed: list[tuple[str, dict[str, Any] | None]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                parsed.append((line, None))
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise NotAnArchive(f"{path}: line {number} is not JSON") from None
            if not isinstance(record, dict) or "body_base64" not in record:
                raise NotAnArchive(f"{path}: line {number} is not a DLQ archive record")
            parsed.append((line, record))
    return parsed


def rewrite_archive(path: Path, matcher: PersonMatcher, *, dry_run: bool) -> ArchiveResult:
    """Remove the records about the person from one archive file, atomically.

    Nothing is written when nothing matches. Otherwise the kept lines go to a new file in the
    same directory (same permissions), which is fsynced and renamed over the old one; the
    directory is fsynced after the rename.
    """
    try:
        lines = _parse(path)
    except UnicodeDecodeError:
        raise NotAnArchive(f"{path}: not UTF-8 text") from None
    result = ArchiveResult(path)
    kept: list[str] = []
    for line, record in lines:
        if record is None:
            kept.append(line)
            continue
        result.records += 1
        if record_mentions(line, record, matcher):
            result.removed += 1
        else:
            kept.append(line)
    if not result.removed or dry_run:
        return result
    mode = path.stat().st_mode & 0o7777
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".erasing")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.writelines(kept)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return result


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def archive_files(paths: list[Path]) -> list[Path]:
    """The files named, and every regular file under the directories named (sorted, no
    hidden files: a leftover ``.…erasing`` file of an interrupted run is not an archive)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return list(dict.fromkeys(found))


# -- dead-letter queues -------------------------------------------------------------------------


async def count_in_dlq(
    connection: AbstractConnection, queue: str, matcher: PersonMatcher
) -> SweepCounts:
    """What a sweep would remove (``--dry-run``): read held, then handed back untouched."""
    counts = SweepCounts()
    async with HeldReader(connection, queue) as reader:
        async for message in reader:
            counts.scanned += 1
            if not is_erasure_message(message) and matcher.in_message(message):
                counts.removed += 1
            else:
                counts.kept += 1
    return counts


@_guarded
async def erase_command(args: argparse.Namespace) -> int:
    if not USER_ID.fullmatch(args.user):
        print(f"eventctl: --user must be a user id (usr_…), not {args.user!r}", file=sys.stderr)
        return EXIT_ERROR
    try:
        matcher = PersonMatcher(args.user, args.also or ())
    except ValueError as exc:
        print(f"eventctl: --also: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        files = archive_files(args.archive or [])
    except FileNotFoundError as exc:
        print(f"eventctl: --archive {exc}", file=sys.stderr)
        return EXIT_ERROR
    dry = " (dry run: nothing removed)" if args.dry_run else ""
    failed = 0
    options = broker_options(args.url, args.prefix)
    async with _connected(options) as connection:
        publisher = Publisher(connection)
        await publisher.open()
        try:
            for owner in dead_letter_owners():
                queue = queues_for(owner, options.prefix).dlq
                try:
                    if args.dry_run:
                        counts = await count_in_dlq(connection, queue, matcher)
                    else:
                        counts = await sweep_queue(connection, publisher, queue, matcher)
                except (DeadLetterQueueMissing, QueueMissing):
                    print(f"erase {queue}: no such queue (skipped)")
                    continue
                except InfrastructureError as exc:
                    failed += 1
                    print(f"erase {queue}: failed ({exc}); run the command again", file=sys.stderr)
                    continue
                print(
                    f"erase {queue}: scanned {counts.scanned}, removed {counts.removed}, "
                    f"kept {counts.kept}{dry}"
                )
        finally:
            await publisher.close()
    for path in files:
        try:
            result = rewrite_archive(path, matcher, dry_run=args.dry_run)
        except NotAnArchive as exc:
            if matcher.in_bytes(path.read_bytes()):
                failed += 1
                print(
                    f"erase archive {exc}, and it mentions the person: not changed, "
                    "handle it by hand",
                    file=sys.stderr,
                )
            else:
                print(f"erase archive {exc} (not changed)")
            continue
        except OSError as exc:
            failed += 1
            print(f"erase archive {path}: failed ({exc}); it is unchanged", file=sys.stderr)
            continue
        print(
            f"erase archive {path}: {result.records} record(s), removed {result.removed}, "
            f"kept {result.records - result.removed}{dry}"
        )
    return EXIT_INCOMPLETE if failed else EXIT_OK


def add_erase_command(groups: Any) -> None:
    erase = groups.add_parser(
        "erase",
        parents=[_broker_arguments()],
        help="remove one person from every DLQ and from DLQ archive files",
        description="Remove every message about a person (their user id, or a string given "
        "with --also, standing on its own, any letter case) from the DLQ of every service and "
        "command queue in the catalog, putting the other messages back with their headers; "
        "then rewrite the given archive files (eventctl dlq archive --to ...) without the "
        "records about the person, atomically (new file, fsync, rename). user.erased "
        "messages and records are kept. Run it after the services have handled user.erased, "
        "over every place archives are kept. Exit 0 done, 1 something failed (run again), 2 "
        "usage or broker error.",
    )
    erase.add_argument("--user", required=True, metavar="USER_ID", help="the erased user (usr_…)")
    erase.add_argument(
        "--also",
        action="append",
        metavar="STRING",
        help="another string that identifies the person, e.g. an address (at least 6 "
        "characters; anything that mentions it is removed); repeatable",
    )
    erase.add_argument(
        "--archive",
        action="append",
        type=Path,
        metavar="PATH",
        help="an archive file, or a directory whose files are archives; repeatable",
    )
    erase.add_argument(
        "--dry-run", action="store_true", help="only count what would be removed; change nothing"
    )
    erase.set_defaults(handler=erase_command)
