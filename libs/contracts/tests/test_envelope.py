import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from tributary.contracts.envelope import (
    CONTENT_TYPE,
    MAX_BODY_BYTES,
    MalformedEvent,
    new_event,
    parse_event,
)
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
        pytest.param(b"\xff\xfe", "not UTF-8", id="not-utf8"),
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


# -- foreign input: limits, types, characters ---------------------------------------------------


def _envelope(**attributes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e1",
        "type": "com.tributary.role.changed.v1",
        "source": "/x",
        "time": "2026-01-01T00:00:00Z",
        "data": {},
    }
    event.update(attributes)
    return {k: v for k, v in event.items() if v is not _ABSENT}


_ABSENT = object()


def _body(**attributes: Any) -> bytes:
    return json.dumps(_envelope(**attributes)).encode()


def _nested_data(depth: int) -> dict[str, Any]:
    """``data`` nested so that the whole body is ``depth`` deep (envelope 1, data 2)."""
    data: dict[str, Any] = {}
    for _ in range(depth - 2):
        data = {"a": data}
    return data


def _sized(size: int) -> bytes:
    """A valid envelope padded to exactly ``size`` bytes."""
    body = _body(pad="")
    return body.replace(b'"pad": ""', b'"pad": "' + b"s" * (size - len(body)) + b'"')


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested more than 32", id="parser-depth"),
        pytest.param(_body(data=_nested_data(33)), "nested more than 32", id="depth-33"),
        pytest.param(
            _body().replace(b"{}", b'{"n": 1' + b"0" * 5000 + b"}"),
            "not JSON",
            id="int-over-4300-digits",
        ),
        pytest.param(_body().replace(b"{}", b'{"n": NaN}'), "not JSON", id="nan"),
        pytest.param(_body().replace(b"{}", b'{"n": -Infinity}'), "not JSON", id="infinity"),
        pytest.param(_body().replace(b"{}", b'{"n": 1e999}'), "not JSON", id="float-overflow"),
        pytest.param(json.dumps(_envelope()).encode("utf-16"), "not UTF-8", id="utf-16"),
        pytest.param(b"\xef\xbb\xbf" + _body(), "not JSON", id="utf-8-bom"),
        pytest.param(_body(data={"s": "\ud800"}), "lone surrogate", id="lone-surrogate-escape"),
        pytest.param(_sized(MAX_BODY_BYTES + 1), "more than the 1048576", id="over-1-mib"),
        pytest.param(_body(id=7), "id: must be a JSON string", id="id-number"),
        pytest.param(_body(time=1767225600), "time: must be a JSON string", id="time-number"),
        pytest.param(_body(time="2026-01-01T00:00:00"), "time", id="time-without-offset"),
        pytest.param(_body(time="2026-01-01"), "time", id="time-date-only"),
        pytest.param(_body(time="0001-01-01T00:00:00+05:00"), "time", id="time-before-year-1"),
        pytest.param(_body(id="a\u0000b"), "id: control character", id="nul-in-id"),
        pytest.param(_body(source="/x\n"), "source: control character", id="newline-in-source"),
        pytest.param(_body(id="\ufffe"), "id: control character", id="noncharacter-in-id"),
        pytest.param(_body(idempotencykey="k" * 201), "idempotencykey", id="long-key"),
        pytest.param(_body(correlationid="c" * 201), "correlationid", id="long-correlation"),
        pytest.param(_body(Trace="x"), "extension name", id="extension-upper-case"),
        pytest.param(_body(my_ext="x"), "extension name", id="extension-underscore"),
        pytest.param(_body(**{"ünï": "x"}), "extension name", id="extension-not-ascii"),
        pytest.param(_body(ext={"a": 1}), "string, boolean or integer", id="extension-object"),
        pytest.param(_body(ext=[1]), "string, boolean or integer", id="extension-array"),
        pytest.param(_body(ext=1.5), "string, boolean or integer", id="extension-float"),
        pytest.param(_body(ext=2**31), "32-bit", id="extension-int-too-big"),
        pytest.param(_body(ext="a\u0007"), "ext: control character", id="extension-bell"),
        pytest.param(_body(specversion=_ABSENT, data=_ABSENT), "no 'data'", id="no-data"),
    ],
)
def test_foreign_bodies_are_malformed_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=reason):
        parse_event(body)


def test_a_str_body_with_a_lone_surrogate_is_malformed() -> None:
    with pytest.raises(MalformedEvent, match="lone surrogate"):
        parse_event(json.dumps(_envelope(id="\udc00"), ensure_ascii=False))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_sized(MAX_BODY_BYTES), id="exactly-1-mib"),
        pytest.param(_body(data=_nested_data(32)), id="depth-32"),
        pytest.param(_body(data={"s": "\ud83d\ude00"}), id="escaped-surrogate-pair"),
        pytest.param(
            json.dumps(
                _envelope(id="ünïcødé-😀", source="/источник", subject="主题", ext="ﷺ ✓"),
                ensure_ascii=False,
            ).encode(),
            id="unicode-everywhere",
        ),
        pytest.param(_body(ext=True, num=-(2**31), n0=None), id="scalar-extensions"),
        pytest.param(
            _body().replace(b"{}", b'{"n": 1' + b"0" * 4000 + b', "f": 1.5e308}'),
            id="big-numbers",
        ),
        pytest.param(_body(time="2026-01-01T00:00:00.123456789+14:00"), id="time-with-offset"),
    ],
)
def test_odd_but_valid_bodies_parse(body: bytes) -> None:
    assert isinstance(parse_event(body).data, dict)


def test_a_producer_cannot_build_an_event_with_a_naive_time() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        new_event(
            routing_key="role.changed.v1",
            source="/services/identity",
            data={},
            time=datetime(2026, 1, 1),
        )
