from datetime import UTC, datetime

import pytest

from tributary.contracts.envelope import CONTENT_TYPE, MalformedEvent, new_event, parse_event
from tributary.contracts.events import UserCreatedV1


def _user_created() -> UserCreatedV1:
    return UserCreatedV1(
        user_id="usr_0123456789",
        email="ada@example.com",
        name="Ada Lovelace",
        plan="free",
        locale="en-GB",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_an_event_round_trips_through_structured_mode_bytes() -> None:
    event = new_event(
        routing_key="user.created.v1",
        source="/services/identity",
        subject="users/usr_0123456789",
        data=_user_created(),
        idempotencykey="user.created:usr_0123456789",
        correlationid="req-1",
    )
    parsed = parse_event(event.to_bytes())
    assert parsed.type == "com.tributary.user.created.v1"
    assert parsed.routing_key == "user.created.v1"
    assert parsed.id == event.id
    assert parsed.correlationid == "req-1"
    assert parsed.inbox_key == "user.created:usr_0123456789"
    assert parsed.data["email"] == "ada@example.com"
    assert parsed.data["created_at"] == "2026-01-01T00:00:00Z"
    assert parsed.dataschema is not None
    assert parsed.dataschema.endswith("user.created.v1.json")
    assert CONTENT_TYPE == "application/cloudevents+json"


def test_the_inbox_key_falls_back_to_type_and_id() -> None:
    event = parse_event(
        b'{"specversion":"1.0","id":"e1","type":"com.tributary.role.changed.v1",'
        b'"source":"/x","time":"2026-01-01T00:00:00Z","data":{}}'
    )
    assert event.inbox_key == "com.tributary.role.changed.v1:e1"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"\xff\xfe", "not JSON", id="not-utf8"),
        pytest.param(b"{nope", "not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "not a CloudEvent object", id="json-array"),
        pytest.param(b'{"hello": "world", "data": {}}', "not a CloudEvent: id", id="no-id"),
        pytest.param(
            b'{"specversion":"0.3","id":"1","type":"t","source":"/s",'
            b'"time":"2026-01-01T00:00:00Z","data":{}}',
            "specversion",
            id="wrong-specversion",
        ),
        pytest.param(
            b'{"specversion":"1.0","id":"1","type":"t","source":"/s","time":"x","data":{}}',
            "time",
            id="bad-time",
        ),
        pytest.param(
            b'{"specversion":"1.0","id":"1","type":"t","source":"/s",'
            b'"time":"2026-01-01T00:00:00Z","data":"text"}',
            "must be a JSON object",
            id="data-not-object",
        ),
    ],
)
def test_bytes_that_are_not_a_cloudevent_are_malformed(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=reason):
        parse_event(body)
