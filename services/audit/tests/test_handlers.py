from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlmodel import col, select

from tributary.audit.chain import GENESIS, entry_hash
from tributary.audit.handlers import audited_types, build_handlers, record_event
from tributary.audit.models import AuditEntry
from tributary.contracts.catalog import catalog
from tributary.contracts.envelope import CloudEvent, new_event
from tributary.contracts.events import AuditCheckpointV1, Payload, UserCreatedV2, WorkspaceCreatedV1
from tributary.contracts.upcasting import upcast
from tributary.service.testing import FakeUnitOfWork, fake_uow

WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def user_created(
    user_id: str = "usr_0123456789",
    *,
    email: str = "ada@example.com",
    correlation_id: str | None = None,
    time: datetime = WHEN,
) -> CloudEvent[UserCreatedV2]:
    return new_event(
        routing_key="user.created.v2",
        source="/services/identity",
        subject=f"users/{user_id}",
        correlationid=correlation_id,
        time=time,
        data=UserCreatedV2(
            user_id=user_id,
            email=email,
            given_name="Ada",
            family_name="Lovelace",
            plan="free",
            locale="en-GB",
            created_at=time,
        ),
    )


def user_created_v1(
    user_id: str = "usr_0123456789",
    *,
    correlation_id: str | None = None,
    time: datetime = WHEN,
) -> CloudEvent[dict[str, Any]]:
    """As an old producer still sends it: ``name`` instead of given and family name."""
    return new_event(
        routing_key="user.created.v1",
        source="/services/identity",
        subject=f"users/{user_id}",
        correlationid=correlation_id,
        time=time,
        data={
            "user_id": user_id,
            "email": "grace@example.com",
            "name": "Grace Hopper",
            "plan": "pro",
            "locale": "en-US",
            "created_at": time.isoformat(),
        },
    )


def workspace_created(
    owner_id: str = "usr_0123456789",
    *,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    time: datetime = WHEN,
) -> CloudEvent[WorkspaceCreatedV1]:
    return new_event(
        routing_key="workspace.created.v1",
        source="/services/onboarding",
        subject=f"workspaces/ws_{owner_id[4:]}",
        correlationid=correlation_id,
        causationid=causation_id,
        time=time,
        data=WorkspaceCreatedV1(
            workspace_id=f"ws_{owner_id[4:]}",
            owner_id=owner_id,
            name="Ada's workspace",
            created_at=time,
        ),
    )


def as_delivered(event: CloudEvent[Any]) -> CloudEvent[Payload]:
    """What the runtime hands a handler: the envelope as sent, the payload upcast to v2."""
    if isinstance(event.data, Payload):
        return cast(CloudEvent[Payload], event)
    version = catalog().by_ce_type(event.type).version
    data = upcast("user.created", version, event.data, UserCreatedV2.version)
    return event.model_copy(update={"data": UserCreatedV2.model_validate(data)})


async def record(uow: FakeUnitOfWork, *events: CloudEvent[Any], key: bytes | None = None) -> None:
    for event in events:
        await record_event(as_delivered(event), cast(Any, uow), pii_key=key)


async def entries(uow: FakeUnitOfWork) -> list[AuditEntry]:
    return list((await uow.session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))).all())


async def test_an_email_is_stored_masked_and_never_in_clear(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await record(uow, user_created(email="ada@example.com"))
        [entry] = await entries(uow)
        assert entry.data["email"] == "a***@example.com"
        assert entry.data["given_name"] == "A***"
        assert entry.data["family_name"] == "L***"
        assert entry.data["user_id"] == "usr_0123456789"  # not PII: kept as is
        assert "ada@example.com" not in repr(entry)
        assert "Lovelace" not in repr(entry)


async def test_with_a_key_pii_is_stored_as_keyed_hashes_that_stay_comparable(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await record(
            uow,
            user_created("usr_aaaaaaaaaa", email="ada@example.com"),
            user_created("usr_bbbbbbbbbb", email="ada@example.com"),
            user_created("usr_cccccccccc", email="bob@example.com"),
            key=b"audit-secret",
        )
        first, second, third = await entries(uow)
        assert first.data["email"].startswith("hmac:")
        assert first.data["email"] == second.data["email"] != third.data["email"]
        assert "ada@example.com" not in repr(first)
        assert "a***@example.com" not in repr(first)


async def test_an_upcast_event_keeps_the_type_it_was_sent_as(tmp_path: Path) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await record(uow, user_created_v1())
        [entry] = await entries(uow)
        assert entry.type == "com.tributary.user.created.v1"
        assert entry.data_type == "user.created.v2"
        assert entry.data["given_name"] == "G***"
        assert entry.data["email"] == "g***@example.com"


async def test_the_envelope_is_recorded_with_the_event_time_in_utc(tmp_path: Path) -> None:
    in_paris = datetime(2026, 3, 1, 13, 30, tzinfo=timezone(timedelta(hours=1)))
    cause = user_created(correlation_id="corr-1")
    event = workspace_created(correlation_id="corr-1", causation_id=cause.id, time=in_paris)
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await record(uow, event)
        [entry] = await entries(uow)
        assert (entry.event_id, entry.type, entry.source, entry.subject) == (
            event.id,
            "com.tributary.workspace.created.v1",
            "/services/onboarding",
            "workspaces/ws_0123456789",
        )
        assert (entry.correlation_id, entry.causation_id) == ("corr-1", cause.id)
        assert entry.event_time == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
        assert entry.recorded_at.tzinfo is not None


async def test_entries_form_a_hash_chain_in_the_order_they_were_recorded(
    tmp_path: Path,
) -> None:
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        await record(uow, user_created(), workspace_created(), user_created_v1())
        first, second, third = await entries(uow)
        assert [first.seq, second.seq, third.seq] == [1, 2, 3]
        assert first.prev_hash == GENESIS
        assert second.prev_hash == first.hash
        assert third.prev_hash == second.hash
        for entry in (first, second, third):
            assert entry.hash == entry_hash(entry, entry.prev_hash)
            assert len(entry.hash) == 64


def test_every_event_type_of_the_catalog_is_audited_at_its_latest_version() -> None:
    events = {spec.name: spec.latest.version for spec in catalog() if spec.kind == "event"}
    del events["audit.checkpoint"]  # its own checkpoints are not recorded in the chain
    assert {t.event_type: t.version for t in audited_types()} == events
    assert "email.send" not in {t.event_type for t in audited_types()}  # a command
    assert set(build_handlers()) == {*audited_types(), AuditCheckpointV1}
