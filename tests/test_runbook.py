"""docs/runbook.md's commands are real.

Every ``eventctl`` command line in its code blocks parses with eventctl's own parser (command
and group exist, flags known, required ones given); every ``eventctl ...`` in its prose names an
existing command and known flags; every ``curl`` URL is a route of the service on that port;
every ``make`` target exists. The DLQ-draining procedure is also run for real by
tests/test_alerts_e2e.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tributary.eventctl.cli import build_parser
from tributary.service.auth import rules_by_route

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "runbook.md"
PORTS = {
    8001: "identity",
    8002: "onboarding",
    8003: "email",
    8004: "audit",
    8005: "notification",
    8006: "billing",
}
TESTED_MARK = "<!-- tested: tests/test_alerts_e2e.py -->"


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(the line before the fence, the block's text) of every fenced block, indented or not."""
    blocks: list[tuple[str, str]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```", lines[i])
        if fence is None:
            i += 1
            continue
        indent, before, body = len(fence.group(1)), lines[i - 1] if i else "", []
        i += 1
        while not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        blocks.append((before, "\n".join(body)))
        i += 1
    return blocks


def command_lines(block: str) -> list[str]:
    """The block's shell lines, continuations joined, prompts dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip().removeprefix("$ ") for line in joined.splitlines() if line.strip()]


def runbook_commands(program: str) -> list[str]:
    return [
        line
        for _, block in code_blocks(RUNBOOK.read_text())
        for line in command_lines(block)
        if line.startswith(f"{program} ")
    ]


def prose_commands() -> list[str]:
    """``eventctl ...`` in inline code spans outside the fenced blocks."""
    text = re.sub(r"^\s*```.*?^\s*```", "", RUNBOOK.read_text(), flags=re.M | re.S)
    text = re.sub(r"\s*\n\s*", " ", text)  # a span may wrap
    return re.findall(r"`(eventctl [^`]+)`", text)


def parse(argv: list[str]) -> tuple[int, str]:
    """eventctl's parser on ``argv``: (0, "") when it parses, else its exit code and message."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0), err.getvalue() + out.getvalue()
    return 0, ""


def subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


def argv_of(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    assert words[0] == "eventctl"
    assert not {"|", ">", "<", "&&", ";"} & set(words), f"keep shell plumbing out: {line}"
    return words[1:]


EVENTCTL = runbook_commands("eventctl")


def test_the_runbook_has_the_commands_it_promises() -> None:
    groups = {tuple(argv_of(line)[:2]) for line in EVENTCTL}
    assert {
        ("dlq", "list"),
        ("dlq", "replay"),
        ("dlq", "archive"),
        ("replay", "outbox"),
        ("outbox", "parked"),
        ("outbox", "resend"),
        ("queue", "show"),
        ("broker", "provision"),
        ("audit", "verify"),
    } <= groups
    [tested] = [
        block for before, block in code_blocks(RUNBOOK.read_text()) if before == TESTED_MARK
    ]
    assert "eventctl dlq replay <service>" in tested


@pytest.mark.parametrize("line", EVENTCTL)
def test_each_eventctl_command_parses(line: str) -> None:
    argv = argv_of(line)
    assert parse(argv) == (0, "")
    code, text = parse([*argv[:2], "--help"])
    assert code == 0
    assert text.startswith(f"usage: eventctl {argv[0]} {argv[1]}")


@pytest.mark.parametrize("span", prose_commands())
def test_each_eventctl_command_in_the_text_exists_with_its_flags(span: str) -> None:
    words = [w for w in shlex.split(span) if not w.startswith("<")]
    path = [w for w in words[1:3] if not w.startswith("-")]
    code, _ = parse([*path, "--help"])
    assert code == 0, f"{span}: no such command"
    known = {s for a in subparser(path)._actions for s in a.option_strings}
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    assert flags <= known, f"{span}: unknown {flags - known}"


def test_a_wrong_flag_or_command_is_caught() -> None:
    assert parse(argv_of("eventctl dlq replay email --nosuch"))[0] == 2
    assert parse(argv_of("eventctl dlq drain email"))[0] == 2
    assert parse(argv_of("eventctl outbox parked"))[0] == 2  # --database is required
    assert parse(argv_of("eventctl replay outbox --database x --type t --from yesterday "
                         "--to-service s"))[0] == 2  # fmt: skip


# --- curl and make -----------------------------------------------------------------------------


@cache
def routes(service: str) -> list[tuple[set[str], re.Pattern[str]]]:
    app = importlib.import_module(f"tributary.{service}.app").create_app()
    found: dict[str, set[str]] = {}
    for key in rules_by_route(app):  # "GET /users/{user_id}", included routers too
        method, _, path = key.partition(" ")
        found.setdefault(path, set()).add(method)
    return [
        (methods, re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"))
        for path, methods in found.items()
    ]


def curl_calls() -> list[tuple[str, int, str]]:
    calls = []
    for line in runbook_commands("curl"):
        words = shlex.split(line, comments=True)
        method = "POST" if "-d" in words else "GET"
        if "-X" in words:
            method = words[words.index("-X") + 1]
        [url] = [w for w in words if w.startswith("http")]
        port, path = re.match(r"^http://127\.0\.0\.1:(\d+)(/[^?]*)", url).groups()  # type: ignore[union-attr]
        calls.append((method, int(port), path))
    return calls


CURLS = curl_calls()


def test_the_runbook_calls_the_services() -> None:
    assert len(CURLS) >= 5


@pytest.mark.parametrize(("method", "port", "path"), CURLS)
def test_each_curl_calls_a_route_of_the_service_on_that_port(
    method: str, port: int, path: str
) -> None:
    service = PORTS[port]
    matches = [methods for methods, pattern in routes(service) if pattern.match(path)]
    assert matches, f"{service} has no route {path}"
    assert any(method in methods for methods in matches), f"{service}: {method} {path}"


def test_each_make_target_exists() -> None:
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    markdown = RUNBOOK.read_text()
    code = [block for _, block in code_blocks(markdown)] + re.findall(r"`([^`\n]+)`", markdown)
    used = {target for text in code for target in re.findall(r"\bmake (?:-s )?([a-z-]+)", text)}
    assert {"dev", "demo", "token", "contracts"} <= used
    assert used <= targets, used - targets
