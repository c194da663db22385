"""The audit timeline page in a real headless Chromium against real service processes.

A person signs up; an event about them that every consumer rejects follows under the same
correlation id. Signed in with an API key through the page (keyboard only: Tab to the field,
Enter to submit), a search by that correlation id draws the sign-up's events with their
producer and each consumer's answer, and the poisoned event's dead letters in red with their
reason. Every input has a label, the browser logs no error, no personal data reaches the page,
and the screenshot in the README is this page (docs/audit-timeline.png).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tributary.testkit.otlp import OtlpReceiver
from tributary.testkit.waiting import wait_until

from .browser import Browser, chromium_binary
from .stack import Stack, get_json
from .test_signup_e2e import sign_up, unique_email

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "audit-timeline.png"
"""Rewritten only with TRIBUTARY_WRITE_SCREENSHOT=1 (its ids change every run); otherwise the
test writes its screenshot to a temporary directory."""
CHROMIUM = chromium_binary()
EXPECTED = {"user.created", "workspace.created", "email.sent"}
"""What the sign-up makes (in whichever version identity publishes user.created)."""

# slow: long and mostly waiting (faults, time windows, processes starting): `make test` runs it
# in its second pytest process, beside the rest of the suite
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium (Debian: apt-get install chromium; CHROMIUM=/path names another one)",
    ),
]


def poisoned_sign_up(user_id: str, correlation_id: str) -> bytes:
    """A user.created.v2 every consumer dead-letters (schema_invalid: the locale)."""
    now = datetime.now(UTC).isoformat()
    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "type": "com.tributary.user.created.v2",
            "source": "/services/identity",
            "time": now,
            "subject": f"users/{user_id}",
            "correlationid": correlation_id,
            "data": {
                "user_id": user_id,
                "email": "grace.poisoned@example.com",
                "given_name": "Grace",
                "family_name": "Hopper",
                "plan": "free",
                "locale": "not a locale",
                "created_at": now,
            },
        }
    ).encode()


def rows(page: Browser, table: str) -> list[dict[str, Any]]:
    """Each row of a table body: its class and its cells' text (header cells included)."""
    return list(
        page.evaluate(
            f"""[...document.querySelectorAll('#{table} tr')].map(tr => ({{
                  cls: tr.className,
                  cells: [...tr.children].map(c => c.innerText.trim()),
                  red: [...tr.children].map(c => getComputedStyle(c).color),
                }}))"""
        )
    )


def test_a_sign_up_and_its_dead_letters_drawn_in_the_browser(stack: Stack, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    shot = (
        SCREENSHOT if os.environ.get("TRIBUTARY_WRITE_SCREENSHOT") == "1" else tmp_path / "ui.png"
    )
    with OtlpReceiver() as receiver:  # spans exported: every event carries a trace id
        stack.otlp = receiver
        stack.start()
        cid = f"ui-{uuid.uuid4().hex[:10]}"
        email = unique_email()
        answer = sign_up(stack, email, correlation_id=cid)
        assert answer.status_code == 201, answer.text
        user_id = answer.json()["id"]
        stack.publish("user.created.v2", poisoned_sign_up(user_id, cid))

        seen: list[str] = []

        def recorded() -> bool:
            entries = get_json(stack, "audit", "/audit", correlation_id=cid)["entries"]
            seen[:] = [e["type"].removeprefix("com.tributary.") for e in entries]
            names = {t.rsplit(".", 1)[0] for t in seen}
            return names >= EXPECTED and seen.count("message.dead_lettered.v1") == 3

        try:
            wait_until(recorded, timeout=40, what="the sign-up and three dead letters")
        except TimeoutError:
            pytest.fail(f"the audit log has {seen} under {cid}\n{stack.logs()[-8000:]}")

        with Browser(CHROMIUM) as page:
            page.open(f"{stack.url('audit')}/audit/ui")
            # every form control has a label; the first Tab reaches the key field
            unlabelled = page.evaluate(
                "[...document.querySelectorAll('input, select, textarea')]"
                ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
            )
            assert unlabelled == []
            # keyboard only: the key field has the focus, Tab reaches the button, Enter on it
            # signs in; then the search field has it, Tab and Shift+Tab move, Enter searches
            assert page.focused() == "api-key"
            page.type(stack.admin_key)
            page.press("Tab")
            assert page.focused() == "button: Sign in"
            page.press("Enter")
            page.wait_for("!document.getElementById('app').hidden", what="signed in")
            page.wait_for(
                "document.getElementById('chain').textContent.startsWith('Chain verified')",
                what="the chain verified",
            )
            assert page.evaluate("document.getElementById('api-key').value") == ""
            assert page.focused() == "correlation-id"
            page.type(cid)
            page.press("Tab")
            assert page.focused() == "user-id"
            page.press("Tab", shift=True)
            assert page.focused() == "correlation-id"
            page.press("Enter")
            page.wait_for(
                "!document.getElementById('timeline').hidden"
                " && document.querySelectorAll('#dead-body tr.dead').length === 3",
                what="the timeline with three dead letters",
            )
            head = page.evaluate(
                "[...document.querySelectorAll('#timeline-head th')].map(t => t.innerText)"
            )
            events = rows(page, "timeline-body")
            dead = rows(page, "dead-body")
            html = page.evaluate("document.documentElement.outerHTML")
            page.evaluate("document.activeElement.blur()")
            page.pump()
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(shot)
            # by user instead: the requests about them, one of which opens its timeline
            page.evaluate("document.getElementById('correlation-id').value = ''")
            page.evaluate("document.getElementById('user-id').focus()")
            page.type(user_id)
            page.press("Enter")
            page.wait_for("!document.getElementById('requests').hidden", what="the requests")
            assert page.evaluate("document.getElementById('timeline').hidden") is True
            requests = rows(page, "requests-body")
            assert [r["cells"][0] for r in requests] == [cid]
            assert requests[0]["cells"][1].startswith("user.created.")
            page.evaluate("document.querySelector('#requests-body button').focus()")
            page.press("Enter")
            page.wait_for(
                "!document.getElementById('timeline').hidden"
                " && document.querySelectorAll('#dead-body tr.dead').length === 3",
                what="the timeline opened from the requests",
            )
            assert page.evaluate("document.getElementById('correlation-id').value") == cid
            page.pump()
            errors = list(page.errors)

    assert head[:3] == ["Time", "Event", "Producer"]
    lanes = head[3:-1]
    assert lanes == ["identity", "onboarding", "email", "notification", "audit"]
    assert head[-1] == "Trace"

    def row(event_type: str, producer: str) -> dict[str, str]:
        [found] = [
            r for r in events if r["cells"][1].startswith(event_type) and r["cells"][2] == producer
        ]
        return dict(
            zip(["time", "event", "producer", *lanes, "trace"], found["cells"], strict=True)
        )

    created = row("user.created.", "identity")
    assert created["identity"] == "● published"
    assert created["onboarding"].startswith("✓ replied +")
    assert "workspace.created.v1" in created["onboarding"]
    assert created["email"].startswith("✓ replied +")
    assert "email.sent.v1" in created["email"]
    assert created["audit"].startswith("✓ recorded +")
    assert created["notification"] == "no record"  # not running in this stack
    assert created["trace"].startswith("trace ")
    assert row("workspace.created.v1", "onboarding")["audit"].startswith("✓ recorded")
    assert row("email.sent.v1", "email")["audit"].startswith("✓ recorded")

    poisoned = row("user.created.v2", "not in the log")
    for consumer in ("onboarding", "email", "audit"):
        assert poisoned[consumer].startswith("✗ dead-lettered: schema_invalid"), poisoned
    [red] = [r for r in events if r["cells"][2] == "not in the log"]
    assert red["cls"] == "dead-row"
    assert set(red["red"]) == {"rgb(207, 34, 46)"}  # drawn in red
    assert sorted(d["cells"][1].split(" ")[0] for d in dead) == ["audit", "email", "onboarding"]
    for letter in dead:
        assert letter["cls"] == "dead"
        assert letter["cells"][3] == "schema_invalid"
        assert letter["cells"][2].startswith("user.created.v2")
        assert set(letter["red"]) == {"rgb(207, 34, 46)"}

    # the trace link goes to Jaeger with the event's trace id
    assert 'href="http://localhost:16686/trace/' in html
    # nothing personal, nothing secret on the page
    for secret in (
        email,
        "Lovelace",
        "grace.poisoned@example.com",
        "Grace",
        "Hopper",
        stack.admin_key,
    ):
        assert secret not in html
    assert errors == []
    assert shot.stat().st_size > 10_000


def test_the_browser_reports_what_a_page_logs_as_an_error() -> None:
    """The ``errors == []`` above means something: a console error, an uncaught exception and
    a resource that fails to load are each caught."""
    assert CHROMIUM is not None
    page_source = (
        "<p>x</p><img src='http://127.0.0.1:9/missing.png'>"
        "<script>console.error('logged'); setTimeout(() => { throw new Error('thrown'); });"
        "</script>"
    )
    with Browser(CHROMIUM) as page:
        page.open("data:text/html," + page_source)
        wait_until(lambda: page.pump() or len(page.errors) >= 3, timeout=10, what="three errors")
        errors = "\n".join(page.errors)
    assert "console: logged" in errors
    assert "thrown" in errors
    assert "missing.png" in errors
