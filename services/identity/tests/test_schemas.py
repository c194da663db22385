from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tributary.contracts.validation import validate
from tributary.identity.schemas import UserCreate, UserUpdate


def sign_up(**overrides: Any) -> dict[str, Any]:
    return {"email": "ada@example.com", "name": "Ada Lovelace", "locale": "en-GB", **overrides}


def refused_field(model: type[UserCreate | UserUpdate], body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return ".".join(str(p) for p in caught.value.errors()[0]["loc"])


@pytest.mark.parametrize(
    "email",
    ["ada@example.com", "Ada.Lovelace+tag@mail.example.co.uk", "o'brien@example.ie"],
)
def test_real_addresses_are_accepted_and_also_pass_the_event_schema(email: str) -> None:
    body = UserCreate.model_validate(sign_up(email=email))
    validate(
        "user.email_changed.v1",
        {
            "user_id": "usr_0123456789",
            "old_email": body.email,
            "new_email": body.email,
            "changed_at": "2026-01-01T00:00:00Z",
        },
    )


@pytest.mark.parametrize(
    "email",
    [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@example",
        "ada @example.com",
        "ada@exa_mple.com",
        "ada@@example.com",
        f"{'a' * 250}@example.com",
    ],
)
def test_malformed_addresses_are_refused_naming_the_email_field(email: str) -> None:
    assert refused_field(UserCreate, sign_up(email=email)) == "email"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "   "),
        ("name", "x" * 201),
        ("locale", "en_GB"),
        ("locale", "EN-gb"),
        ("plan", "enterprise"),
        ("role", "admin"),
    ],
)
def test_bad_sign_up_fields_are_refused_by_name(field: str, value: str) -> None:
    assert refused_field(UserCreate, sign_up(**{field: value})) == field


def test_names_are_trimmed_and_the_plan_defaults_to_free() -> None:
    body = UserCreate.model_validate(sign_up(name="  Ada  "))
    assert (body.name, body.plan) == ("Ada", "free")


def test_an_update_refuses_null_and_fields_it_cannot_change() -> None:
    assert refused_field(UserUpdate, {"email": None}) == "email"
    assert refused_field(UserUpdate, {"plan": "pro"}) == "plan"
    assert UserUpdate.model_validate({}).model_dump(exclude_unset=True) == {}
