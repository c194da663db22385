"""Forged messages against the real services, each connected as its own broker user with the
sender check on (tests/stack.py).

The rogue is a broker account with every right on the vhost (here ``guest``, the shared
account every service used before): the broker lets it publish anything, and the services
must refuse to act on it. Each forged message is dead-lettered ``unauthorized_producer`` with
no effect, and the genuine message is processed as if the forgery never happened.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from tributary.contracts.envelope import new_event
from tributary.contracts.events import EmailSendV1, PaymentSucceededV1, UserCreatedV2
from tributary.messaging import headers as h
from tributary.testkit.waiting import wait_until

from .stack import Letter, Stack, get_json

UNAUTHORIZED = "unauthorized_producer"


def _sign_up(stack: Stack) -> tuple[str, str]:
    email = f"ada.{uuid.uuid4().hex[:10]}@example.com"
    with stack.client("identity") as client:
        answer = client.post(
            "/users",
            json={"email": email, "name": "Ada Lovelace", "plan": "free", "locale": "en-GB"},
        )
    answer.raise_for_status()
    return answer.json()["id"], email


def _unauthorized(stack: Stack, queue_set: str, *event_ids: str) -> list[Letter]:
    """The dead letters of these events in that DLQ, waited for; each must be unauthorized."""
    found: dict[str, Letter] = {}

    def arrived() -> bool:
        for letter in stack.take_dead_letters(queue_set):
            found.update({i: letter for i in event_ids if i.encode() in letter.body})
        return len(found) == len(event_ids)

    wait_until(arrived, what=f"{', '.join(event_ids)} in {queue_set}.dlq")
    for letter in found.values():
        assert h.text(letter.headers[h.REASON]) == UNAUTHORIZED, letter.headers
    return list(found.values())


def _payment(user_id: str) -> Any:
    return new_event(
        routing_key="payment.succeeded.v1",
        source="/services/billing",
        subject=f"users/{user_id}",
        idempotencykey=f"payment.succeeded:pay_{uuid.uuid4().hex[:16]}",
        data=PaymentSucceededV1(
            payment_id=f"pay_{uuid.uuid4().hex[:16]}",
            user_id=user_id,
            amount_cents=1900,
            currency="EUR",
            plan="pro",
            provider_reference="forged",
            paid_at=datetime.now(UTC),
        ),
    )


def _announced(stack: Stack, message_id: str, n: int) -> list[dict[str, Any]]:
    """Audit's entries of the message.dead_lettered events about ``message_id``, waited for
    until there are ``n``."""
    found: list[dict[str, Any]] = []

    def recorded() -> bool:
        entries = get_json(stack, "audit", "/audit", type="message.dead_lettered", limit=200)
        found[:] = [e for e in entries["entries"] if e["data"].get("message_id") == message_id]
        return len(found) >= n

    wait_until(recorded, what=f"audit's records of the dead letters of {message_id}")
    return found


def _plan(stack: Stack, user_id: str) -> str:
    return str(get_json(stack, "identity", f"/users/{user_id}")["plan"])


def test_a_forged_payment_upgrades_nothing_and_the_real_one_does(shared_stack: Stack) -> None:
    stack = shared_stack
    user_id, _ = _sign_up(stack)
    forged = _payment(user_id)
    stack.publish("payment.succeeded.v1", forged.to_bytes(), url=stack.broker_url)
    letters = _unauthorized(stack, "identity", forged.id)
    # the dead letter names no producer: guest is outside the stack's users
    assert h.PRODUCER not in letters[0].headers
    assert _plan(stack, user_id) == "free"
    # each consumer announced its dead letter (message.dead_lettered may be published by every
    # service's user, and audit's sender check lets it through): audit records both
    told = {e["data"]["service"]: e for e in _announced(stack, forged.id, 2)}
    assert sorted(told) == ["audit", "identity"]
    for service, entry in told.items():
        assert entry["source"] == f"/services/{service}"
        assert (entry["data"]["reason"], entry["data"]["consumer"]) == (UNAUTHORIZED, service)
    assert h.text(letters[0].headers[h.ANNOUNCEMENT]) == told["identity"]["event_id"]

    real = _payment(user_id)  # from the billing service's own user
    stack.publish("payment.succeeded.v1", real.to_bytes())
    wait_until(lambda: _plan(stack, user_id) == "pro", what="the plan upgraded by billing")


def test_a_forged_email_send_sends_nothing(shared_stack: Stack) -> None:
    """The bus is no open mail relay: only the catalog's senders may command a mail."""
    stack = shared_stack
    victim = f"victim.{uuid.uuid4().hex[:8]}@example.com"

    def command() -> Any:
        return new_event(
            routing_key="email.send.v1",
            source="/services/notification",
            data=EmailSendV1(
                request_id=uuid.uuid4(), to=victim, template="notification", subject="Hello"
            ),
        )

    forged = command()
    stack.publish("email.send.v1", forged.to_bytes(), url=stack.broker_url)
    _unauthorized(stack, "email.send", forged.id)

    real = command()  # from the notification service's user, the command's sender
    stack.publish("email.send.v1", real.to_bytes())
    wait_until(lambda: stack.mail.to(victim), what="the mail commanded by notification")
    assert len(stack.mail.to(victim)) == 1  # the forged one never reached SMTP


def _user_created(user_id: str, email: str, key: str) -> Any:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        subject=f"users/{user_id}",
        idempotencykey=key,
        data=UserCreatedV2(
            user_id=user_id,
            email=email,
            given_name="Ada",
            family_name="Lovelace",
            plan="free",
            locale="en-GB",
            created_at=datetime.now(UTC),
        ),
    )


def _workspaces(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json(stack, "onboarding", "/workspaces", owner_id=user_id)
    return found


def test_a_forged_replay_marker_or_stolen_key_changes_nothing(shared_stack: Stack) -> None:
    """A rogue ``user.created`` marked as a replay (it would suppress the welcome mail if
    believed), and one taking the idempotency key of the genuine event first (it would make
    the genuine one a conflict): both dead-lettered; the genuine event is handled in full."""
    stack = shared_stack
    user_id = f"usr_{uuid.uuid4().hex[:20]}"
    email = f"ada.{uuid.uuid4().hex[:10]}@example.com"
    key = f"user.created:{user_id}"
    marked = _user_created(user_id, email, key)
    stack.publish(
        "user.created.v2", marked.to_bytes(), url=stack.broker_url, headers={h.REPLAY: "1"}
    )
    squatter = _user_created(user_id, "squatter@example.com", key)
    stack.publish("user.created.v2", squatter.to_bytes(), url=stack.broker_url)
    for queue_set in ("onboarding", "email", "audit"):
        _unauthorized(stack, queue_set, marked.id, squatter.id)
    assert _workspaces(stack, user_id) == []

    genuine = _user_created(user_id, email, key)  # identity's own user, same key
    stack.publish("user.created.v2", genuine.to_bytes())
    wait_until(lambda: _workspaces(stack, user_id), what="the workspace of the genuine event")
    wait_until(lambda: stack.mail.to(email), what="the welcome mail (not suppressed)")
    assert stack.mail.to("squatter@example.com") == []
    assert stack.take_dead_letters("onboarding") == []  # no conflict, nothing else failed
