from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from tributary.identity.models import ApiKey, User, hash_secret, normalize_email
from tributary.service.testing import fake_uow


def test_new_users_get_contract_shaped_ids_and_start_as_members() -> None:
    user = User.register(email="Ada@Example.com", name="Ada", plan="free", locale="en-GB")
    assert re.fullmatch(r"usr_[0-9a-f]{20}", user.id)
    assert user.role == "member"
    assert user.email == "Ada@Example.com"
    assert user.email_normalized == "ada@example.com"


def test_emails_are_compared_without_regard_to_letter_case() -> None:
    assert normalize_email("ADA@Example.COM") == normalize_email("ada@example.com")


def test_an_issued_api_key_keeps_only_the_hash_of_its_secret() -> None:
    key, secret = ApiKey.issue("usr_0123456789", "ci")
    assert re.fullmatch(r"key_[0-9a-f]{20}", key.id)
    assert re.fullmatch(r"trib_[A-Za-z0-9_-]{43}", secret)
    assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
    assert secret not in key.model_dump_json()
    assert key.prefix == secret[:9]


def test_every_issued_secret_is_new() -> None:
    assert ApiKey.issue("usr_0123456789", None)[1] != ApiKey.issue("usr_0123456789", None)[1]


async def test_timestamps_read_back_from_sqlite_are_aware_utc(tmp_path: Path) -> None:
    paris = timezone(timedelta(hours=1))
    async with fake_uow(str(tmp_path / "db.sqlite")) as uow:
        user = User.register(email="ada@example.com", name="Ada", plan="free", locale="en-GB")
        user.created_at = datetime(2026, 1, 2, 13, 0, tzinfo=paris)
        uow.session.add(user)
        await uow.session.commit()
        uow.session.expunge_all()

        stored = await uow.session.get(User, user.id)
        assert stored is not None
        assert stored.created_at == datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
        assert stored.created_at.tzinfo == UTC
