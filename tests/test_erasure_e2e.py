"""Erasure across the four services as real processes: the person is found nowhere afterwards.

A user signs up, changes their address (mail goes to the new one), has an API key, a paid plan,
messages about them in the dead-letter queues and an archive of one DLQ. After ``DELETE
/users/{id}`` and ``eventctl erase``, every table of every service's database (outbox and
inbox included), every DLQ and the archive file are searched for their addresses and their
name: nothing. The audit chain still verifies, and the address still gets no second welcome
within the window.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import string
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from sqlalchemy import inspect, text

from tributary.contracts.envelope import new_event
from tributary.contracts.events import PaymentSucceededV1
from tributary.eventctl.cli import main as eventctl
from tributary.messaging.db import create_engine
from tributary.testkit.waiting import wait_until

from .stack import SIGNUP_SERVICES, Stack, get_json

# slow: a long end-to-end run of real processes: `make test` runs it in its second pytest process,
# beside the rest of the suite
pytestmark = pytest.mark.slow

DLQ_OWNERS = (*SIGNUP_SERVICES, "email.send")


def letters(n: int) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=n))


class Person:
    """Someone with a name and addresses no other test data contains."""

    def __init__(self) -> None:
        tag = letters(8)
        self.given = f"Ysolde{tag}"
        self.family = f"Quillfeather{letters(6)}"
        self.name = f"{self.given} {self.family}"
        self.first = f"Ysolde.{tag}@Example.com"  # mixed case: as the user typed it
        self.second = f"y.quill.{tag}@example.org"

    def needles(self) -> dict[str, str]:
        """What must not be found, by a label that is safe to print."""
        return {
            "first address": self.first.lower(),
            "second address": self.second.lower(),
            "given name": self.given.lower(),
            "family name": self.family.lower(),
        }


def invalid_sign_up(user_id: str, email: str, given: str, family: str) -> dict[str, Any]:
    """A user.created.v2 that every consumer dead-letters (schema_invalid: the locale)."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": "com.tributary.user.created.v2",
        "source": "/partners/crm",
        "time": datetime.now(UTC).isoformat(),
        "subject": f"users/{user_id}",
        "data": {
            "user_id": user_id,
            "email": email,
            "given_name": given,
            "family_name": family,
            "plan": "free",
            "locale": "not a locale",
            "created_at": datetime.now(UTC).isoformat(),
        },
    }


# -- where the person could be --------------------------------------------------------------------


async def _database_text(url: str) -> str:
    """Every value of every table, text and binary alike, as one lower-case text."""
    engine = create_engine(url)
    found: list[str] = []
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            for table in tables:
                rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()  # noqa: S608
                for row in rows:
                    for value in row:
                        if isinstance(value, bytes | memoryview):
                            found.append(bytes(value).decode(errors="replace"))
                        elif isinstance(value, dict | list):
                            found.append(json.dumps(value, ensure_ascii=False))
                        elif value is not None:
                            found.append(str(value))
    finally:
        await engine.dispose()
    return "\n".join(found).lower()


async def _dlq_messages(stack: Stack) -> dict[str, list[str]]:
    """Each DLQ's messages (body, headers and ids as text), read and handed back untouched."""
    found: dict[str, list[str]] = {}
    connection = await aio_pika.connect(stack.broker_url)
    async with connection:
        for owner in DLQ_OWNERS:
            queue_name = f"{stack.prefix}{owner}.dlq"
            channel = await connection.channel()
            queue = await channel.get_queue(queue_name, ensure=False)
            messages = []
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                headers = json.dumps(dict(message.headers or {}), default=str, ensure_ascii=False)
                body = message.body.decode(errors="replace")
                messages.append(
                    f"{message.message_id}\n{message.correlation_id}\n{headers}\n{body}"
                )
            await channel.close()  # hands every message back
            found[owner] = messages
    return found


def archive_text(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    bodies = [base64.b64decode(json.loads(line)["body_base64"]).decode() for line in lines]
    return "\n".join(lines + bodies).lower()


def leaks(stack: Stack, person: Person, user_id: str, archive: Path | None = None) -> list[str]:
    """Where the person is still found: ``service database: first address`` and so on."""
    places: dict[str, str] = {
        f"{name} database": asyncio.run(_database_text(url))
        for name, url in stack.database_urls.items()
    }
    for owner, messages in asyncio.run(_dlq_messages(stack)).items():
        places[f"{owner} DLQ"] = "\n".join(messages).lower()
    if archive is not None:
        places["archive"] = archive_text(archive)
    needles = person.needles()
    found = [
        f"{place}: {label}"
        for place, haystack in places.items()
        for label, needle in needles.items()
        if needle in haystack
    ]
    for place, haystack in places.items():
        if (place.endswith("DLQ") or place == "archive") and user_id in haystack:
            found.append(f"{place}: user id")
    return found


async def _handled(url: str, key: str) -> bool:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = text("SELECT count(*) FROM tributary_inbox WHERE key = :key")
            return bool((await conn.execute(query, {"key": key})).scalar_one())
    finally:
        await engine.dispose()


def erasure_handled_everywhere(stack: Stack, user_id: str) -> bool:
    """Every service's inbox has user.erased: its handler, DLQ sweep included, committed.

    (Not the DLQs themselves: reading them while a service sweeps would hide messages from
    the sweep.)
    """
    key = f"identity|user.erased:{user_id}"  # the inbox key is the producer's (sender check)
    return all(asyncio.run(_handled(url, key)) for url in stack.database_urls.values())


def announcing(stack: Stack, message_id: str) -> set[str]:
    """The services whose message.dead_lettered about ``message_id`` audit has recorded."""
    entries = get_json(stack, "audit", "/audit", type="message.dead_lettered", limit=500)
    about = [e["data"] for e in entries["entries"] if e["data"].get("message_id") == message_id]
    return {data["service"] for data in about}


def dlq_ids(stack: Stack) -> dict[str, set[str]]:
    return {
        owner: {m.split("\n", 1)[0] for m in messages}
        for owner, messages in asyncio.run(_dlq_messages(stack)).items()
    }


# -- the test --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["sqlite", "postgres"], indirect=True)
def test_an_erased_user_is_found_in_no_database_outbox_dlq_or_archive(
    stack: Stack, tmp_path: Path
) -> None:
    stack.extra_env["EMAIL_ADDRESS_KEY"] = f"e2e-{uuid.uuid4().hex}"
    stack.start()
    person = Person()
    cid = f"erase-e2e-{uuid.uuid4().hex[:8]}"

    # every flow: sign-up (workspace, welcome mail, audit), API key, address change, paid plan
    with stack.client("identity") as identity:
        signed = identity.post(
            "/users",
            json={"email": person.first, "name": person.name, "locale": "en-GB"},
            headers={"Idempotency-Key": uuid.uuid4().hex, "X-Correlation-ID": cid},
        )
        assert signed.status_code == 201, signed.text
        user_id = signed.json()["id"]
        key = identity.post(f"/users/{user_id}/api-keys", json={"name": f"{person.given}'s key"})
        assert key.status_code == 201, key.text
        wait_until(lambda: stack.mail.to(person.first), what="the welcome email")
        changed = identity.patch(f"/users/{user_id}", json={"email": person.second})
        assert changed.status_code == 200, changed.text
    wait_until(
        lambda: get_json(stack, "onboarding", "/workspaces", owner_id=user_id),
        what="the workspace",
    )
    payment = new_event(
        routing_key="payment.succeeded.v1",
        source="/services/billing",
        idempotencykey=f"payment.succeeded:pay_{user_id[4:]}",
        data=PaymentSucceededV1(
            payment_id=f"pay_{user_id[4:]}",
            user_id=user_id,
            amount_cents=1900,
            currency="EUR",
            plan="pro",
            provider_reference="ch_e2e",
            paid_at=datetime.now(UTC),
        ),
    )
    stack.publish("payment.succeeded.v1", payment.to_bytes(), message_id=payment.id)
    wait_until(lambda: stack.mail.to(person.second), what="the plan email, to the new address")

    # messages about the person in the DLQs (and one about someone else), one DLQ archived
    mine = invalid_sign_up(user_id, person.first, person.given, person.family)
    theirs = invalid_sign_up("usr_someoneelse000001", "someone@example.net", "Some", "One")
    bad_payment = json.loads(payment.to_bytes())
    bad_payment.update(id=str(uuid.uuid4()), data={**bad_payment["data"], "amount_cents": 0})
    for event, key_ in ((mine, "user.created.v2"), (theirs, "user.created.v2")):
        stack.publish(key_, json.dumps(event).encode(), message_id=event["id"])
    stack.publish(
        "payment.succeeded.v1", json.dumps(bad_payment).encode(), message_id=bad_payment["id"]
    )
    both = {mine["id"], theirs["id"]}
    wait_until(
        lambda: (
            (ids := dlq_ids(stack))["onboarding"] >= both
            and ids["email"] >= both
            and ids["audit"] >= both
            and bad_payment["id"] in ids["identity"]
        ),
        what="the invalid events dead-lettered by every consumer",
    )
    archive = tmp_path / "archives" / "onboarding-dlq.jsonl"
    broker = ["--url", stack.url_of("eventctl"), "--prefix", stack.prefix]
    assert eventctl(["dlq", "archive", "onboarding", "--to", str(archive), *broker]) == 0
    assert len(archive.read_text().splitlines()) == 2
    wait_until(
        lambda: get_json(stack, "audit", "/audit", subject=f"users/{user_id}", limit=50),
        what="audit entries about the user",
    )
    # every consumer announced its dead letters (message.dead_lettered, no payload, no PII):
    # audit records them, and the audit database below holds none of the person's data
    wait_until(
        lambda: announcing(stack, mine["id"]) == {"onboarding", "email", "audit"},
        what="the announcements of the dead letters in the audit log",
    )
    before = set(leaks(stack, person, user_id, archive))  # the search does find them
    assert {
        "identity database: first address",
        "identity database: family name",
        "onboarding database: given name",
        "email database: second address",
        "email DLQ: first address",
        "audit DLQ: family name",
        "identity DLQ: user id",
        "archive: first address",
    } <= before
    assert not any(place.startswith("audit database") for place in before)  # masked from the start

    # the erasure
    with httpx.Client(base_url=stack.url("identity"), timeout=10) as client:
        erased = client.delete(f"/users/{user_id}", headers=stack.admin_headers())
    assert erased.status_code == 204, erased.text
    wait_until(
        lambda: erasure_handled_everywhere(stack, user_id),
        timeout=60,
        what="every service to handle user.erased",
    )
    assert leaks(stack, person, user_id) == []  # the services' own work: databases and DLQs
    argv = ["erase", "--user", user_id, "--also", person.first, "--also", person.second]
    assert eventctl([*argv, "--archive", str(archive.parent), *broker]) == 0

    assert leaks(stack, person, user_id, archive) == []
    ids = dlq_ids(stack)
    assert theirs["id"] in ids["email"]  # someone else's dead letters stay
    assert theirs["id"] in ids["audit"]
    assert [json.loads(line)["message_id"] for line in archive.read_text().splitlines()] == [
        theirs["id"]
    ]
    # the announcements stay: they name no one, and they are part of the chain
    assert announcing(stack, mine["id"]) == {"onboarding", "email", "audit"}
    erasures = get_json(stack, "audit", "/audit", type="user.erased", subject=f"users/{user_id}")
    assert len(erasures["entries"]) == 1
    assert get_json(stack, "audit", "/audit/verify")["ok"] is True
    with stack.client("identity") as identity:
        assert identity.get(f"/users/{user_id}").status_code == 404
        assert identity.delete(f"/users/{user_id}").status_code == 404

        # the address is free again, but gets no second welcome within the window
        again = identity.post(
            "/users", json={"email": person.first, "name": "Another", "locale": "en-GB"}
        )
        assert again.status_code == 201, again.text
    suppressed = wait_until(
        lambda: get_json(stack, "email", "/emails", to=person.first),
        what="the second welcome recorded",
    )
    assert [e["status"] for e in suppressed] == ["suppressed"]
    assert len(stack.mail.to(person.first)) == 1
