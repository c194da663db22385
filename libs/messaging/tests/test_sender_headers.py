"""Who produced a delivery (``headers.producer_of``) and the inbox key scoped by it: both read
foreign input (the user id the broker vouches for, headers anyone may set)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given
from hypothesis import strategies as st

from tributary.messaging import headers as h
from tributary.messaging.consumer import QueueConsumer
from tributary.messaging.db import create_engine
from tributary.messaging.erasure import Provenance, kept_copy
from tributary.messaging.settings import MessagingSettings
from tributary.messaging.topology import Names

TRUSTED: dict[str, str | None] = {"p.onboarding": "onboarding", "p.eventctl": None}
header_values = st.one_of(
    st.none(), st.text(max_size=300), st.binary(max_size=300), st.integers(), st.booleans()
)


def _message(user_id: str | None, headers: dict[str, Any]) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, SimpleNamespace(user_id=user_id, headers=headers))


def test_the_sender_is_the_producer_unless_it_is_trusted() -> None:
    forged = {h.PRODUCER: "identity"}
    assert h.producer_of(_message("p.audit", forged), prefix="p.", trusted=TRUSTED) == "audit"
    assert h.producer_of(_message("guest", forged), prefix="p.", trusted=TRUSTED) is None
    assert h.producer_of(_message(None, forged), prefix="p.", trusted=TRUSTED) is None
    copy = _message("p.onboarding", forged)
    assert h.producer_of(copy, prefix="p.", trusted=TRUSTED) == "identity"
    own = _message("p.onboarding", {})
    assert h.producer_of(own, prefix="p.", trusted=TRUSTED) == "onboarding"
    operator = _message("p.eventctl", {})
    assert h.producer_of(operator, prefix="p.", trusted=TRUSTED) is None
    replayed = _message("p.eventctl", {h.PRODUCER: b"identity"})
    assert h.producer_of(replayed, prefix="p.", trusted=TRUSTED) == "identity"


@given(user=st.one_of(st.none(), st.text(max_size=50)), value=header_values)
def test_only_trusted_senders_name_another_producer(user: str | None, value: Any) -> None:
    headers = {} if value is None else {h.PRODUCER: value}
    producer = h.producer_of(_message(user, headers), prefix="p.", trusted=TRUSTED)
    if not user:
        assert producer is None
    elif user in TRUSTED:
        assert producer is None or len(producer) <= 200
        if value is None:
            assert producer == TRUSTED[user]
    elif user.startswith("p."):
        assert producer == (user[2:] or None)  # the header is never read
    else:
        assert producer is None


def _consumer(tmp_path: Path, *, verify: bool) -> QueueConsumer:
    settings = MessagingSettings(verify_sender=verify, broker_user_prefix="p.")
    names = Names("")
    return QueueConsumer(
        service="onboarding",
        queues=names.service_queues("onboarding", 1),
        subscriptions={},
        engine=create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"),
        publisher=cast(Any, SimpleNamespace(user="p.onboarding")),
        names=names,
        settings=settings,
        on_commit=lambda: None,
        listeners=[],
    )


def test_the_inbox_key_is_unchanged_without_the_check(tmp_path: Path) -> None:
    consumer = _consumer(tmp_path, verify=False)
    assert consumer._inbox_key("user.created:u1", "audit") == "user.created:u1"


@given(
    key=st.text(min_size=1, max_size=450),
    a=st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=100, max_size=200)),
)
def test_inbox_keys_are_bounded_and_differ_by_producer(key: str, a: str) -> None:
    consumer = _consumer(Path("/nonexistent"), verify=True)
    scoped = consumer._inbox_key(key, a)
    assert len(scoped) <= 400
    assert scoped != consumer._inbox_key(key, a + "x")


def _dead_letter(user_id: str | None, headers: dict[str, Any]) -> AbstractIncomingMessage:
    fields = dict.fromkeys(
        (
            "content_type",
            "content_encoding",
            "priority",
            "correlation_id",
            "reply_to",
            "message_id",
            "timestamp",
            "type",
            "app_id",
        )
    )
    return cast(
        AbstractIncomingMessage,
        SimpleNamespace(body=b"{}", user_id=user_id, headers=headers, **fields),
    )


def test_a_dlq_put_back_names_the_producer_it_can_vouch_for() -> None:
    """The sweep republishes as the service: a dead letter of the broker keeps its producer's
    user id, which becomes the header; a header forged by another sender is replaced."""
    provenance = Provenance("p.", TRUSTED)
    by_broker = kept_copy(_dead_letter("p.identity", {"x-death": []}), provenance)
    assert by_broker.headers[h.PRODUCER] == "identity"
    forged = kept_copy(_dead_letter("p.audit", {h.PRODUCER: "identity"}), provenance)
    assert forged.headers[h.PRODUCER] == "audit"
    anonymous = kept_copy(_dead_letter(None, {h.PRODUCER: "identity"}), provenance)
    assert h.PRODUCER not in anonymous.headers
    ours = kept_copy(_dead_letter("p.onboarding", {h.PRODUCER: "identity"}), provenance)
    assert ours.headers[h.PRODUCER] == "identity"
    unchecked = kept_copy(_dead_letter("p.audit", {h.PRODUCER: "identity"}))
    assert unchecked.headers[h.PRODUCER] == "identity"  # the check off: kept as it was
