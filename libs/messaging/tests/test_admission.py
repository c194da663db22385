"""What a consumer admits: the same verdict with the flat schema shortcut as without it.

The shortcut replaces jsonschema by the flat check for an event of the handler's own version;
an invalid payload must still be dead-lettered (``schema_invalid``) and a valid one accepted,
with the same payload and the same inbox hash.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.contracts.tests.samples import sample
from libs.contracts.tests.test_flat_check import payloads
from tributary.contracts.catalog import catalog
from tributary.contracts.events import (
    EmailSentV1,
    Payload,
    PaymentFailedV1,
    UserCreatedV1,
    UserCreatedV2,
)
from tributary.messaging.consumer import admit, payload_hash
from tributary.messaging.errors import Rejected

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (version of the event, model of the handler): own versions take the shortcut, v1 -> v2 not
CASES = [
    ("user.created.v2", UserCreatedV2),
    ("user.created.v1", UserCreatedV2),
    ("user.created.v1", UserCreatedV1),
    ("email.sent.v1", EmailSentV1),
    ("payment.failed.v1", PaymentFailedV1),
]


def _outcome(routing_key: str, model: type[Payload], data: Any, *, shortcut: bool) -> Any:
    spec = catalog().by_routing_key(routing_key)
    try:
        payload, made_of = admit(spec, model, data, shortcut=shortcut)
    except Rejected as exc:
        return ("dead_lettered", exc.reason)
    return ("accepted", payload, payload_hash(made_of))


@pytest.mark.parametrize(
    ("routing_key", "model"), CASES, ids=[f"{k}->{m.__name__}" for k, m in CASES]
)
@FUZZ
@given(data=st.data())
def test_invalid_payloads_are_dead_lettered_with_and_without_the_shortcut(
    routing_key: str, model: type[Payload], data: Any
) -> None:
    payload = data.draw(payloads(routing_key))
    with_shortcut = _outcome(routing_key, model, payload, shortcut=True)
    without = _outcome(routing_key, model, payload, shortcut=False)
    assert with_shortcut == without, payload


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"email": "no-at-sign"}, id="email-format"),
        pytest.param({"created_at": 1767225600}, id="time-as-number"),
        pytest.param({"created_at": "2026-01-01 00:00:00+00:00"}, id="time-with-a-space"),
        pytest.param({"family_name": None}, id="null"),
    ],
)
def test_what_the_model_alone_would_accept_is_still_dead_lettered(
    overrides: dict[str, Any],
) -> None:
    payload = {**sample("user.created.v2"), **overrides}
    assert _outcome("user.created.v2", UserCreatedV2, payload, shortcut=True) == (
        "dead_lettered",
        "schema_invalid",
    )


def test_a_valid_event_is_admitted_with_the_same_payload_and_hash() -> None:
    data = sample("user.created.v2", nickname="ada")  # unknown fields are ignored
    fast = _outcome("user.created.v2", UserCreatedV2, data, shortcut=True)
    full = _outcome("user.created.v2", UserCreatedV2, data, shortcut=False)
    assert fast == full
    assert fast[0] == "accepted"


def test_the_inbox_hash_of_a_stored_event_is_unchanged() -> None:
    """Rows already in an inbox keep matching: the canonical JSON and its hash are pinned."""
    data = sample("user.created.v2")
    _, made_of = admit(catalog().by_routing_key("user.created.v2"), UserCreatedV2, data)
    assert made_of is data
    assert payload_hash(made_of) == (
        "44cb1896ed7332674d4ad4658f2864b146bafbce6828527f73a6df3502363ce0"
    )


class _Session:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    def add(self, row: Any) -> None:
        self.rows.append(row)


@pytest.mark.parametrize(
    ("overrides", "field", "rule"),
    [
        pytest.param({"email": "no-at-sign"}, "data.email", "format", id="email-format"),
        pytest.param({"plan": "gold"}, "data.plan", "enum", id="enum"),
        pytest.param({"given_name": ""}, "data.given_name", "minLength", id="min-length"),
    ],
)
def test_the_outbox_refuses_a_payload_its_schema_refuses_as_before(
    overrides: dict[str, Any], field: str, rule: str
) -> None:
    """A payload built without validation (``model_construct``) is still checked strictly."""
    from tributary.contracts.validation import SchemaViolation, validate
    from tributary.messaging.uow import Outbox

    fields = {**UserCreatedV2.model_validate(sample("user.created.v2")).model_dump(), **overrides}
    payload = UserCreatedV2.model_construct(**fields)
    session = _Session()
    outbox = Outbox(session, "identity")  # type: ignore[arg-type]
    with pytest.raises(SchemaViolation) as fast:
        outbox.add(payload)
    with pytest.raises(SchemaViolation) as full:
        validate("user.created.v2", payload.model_dump(mode="json", exclude_none=True), "strict")
    assert (fast.value.field, fast.value.rule) == (full.value.field, full.value.rule)
    assert (fast.value.field, fast.value.rule) == (field, rule)
    assert session.rows == []
    outbox.add(UserCreatedV2.model_validate(sample("user.created.v2")))
    assert len(session.rows) == 1
