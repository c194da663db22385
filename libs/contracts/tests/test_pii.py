from hypothesis import given
from hypothesis import strategies as st

from tributary.contracts.pii import hash_value, mask_payload, mask_value, scrub_text


def test_an_email_keeps_its_first_letter_and_domain() -> None:
    assert mask_value("ada@example.com") == "a***@example.com"
    assert mask_value("Ada Lovelace") == "A***"
    assert mask_value("") == ""
    assert mask_value("Q") == "***"  # its first letter would be all of it
    assert mask_value(None) is None


_NO_STARS = st.characters(exclude_characters="*", exclude_categories=["Cs"])


@given(name=st.text(_NO_STARS, min_size=1, max_size=60))
def test_a_masked_name_never_contains_the_name(name: str) -> None:
    assert name not in mask_value(name)


@given(local=st.text(_NO_STARS, min_size=1, max_size=30), domain=st.text(_NO_STARS, max_size=30))
def test_a_masked_address_never_contains_the_address(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    assert address not in mask_value(address)


def test_x_pii_fields_are_masked_and_others_kept() -> None:
    masked = mask_payload(
        "user.created.v1",
        {"user_id": "usr_0123456789", "email": "ada@example.com", "name": "Ada", "plan": "pro"},
    )
    assert masked == {
        "user_id": "usr_0123456789",
        "email": "a***@example.com",
        "name": "A***",
        "plan": "pro",
    }


def test_nested_pii_objects_are_masked_whole() -> None:
    masked = mask_payload("email.send.v1", {"variables": {"name": "Ada"}, "template": "welcome"})
    assert masked == {"variables": {"name": "A***"}, "template": "welcome"}


def test_keyed_hashes_keep_equality_without_the_value() -> None:
    a = mask_payload("user.created.v1", {"email": "ada@example.com"}, style="hash", key=b"k")
    b = mask_payload("user.created.v1", {"email": "ada@example.com"}, style="hash", key=b"k")
    other_key = hash_value("ada@example.com", b"other")
    assert a == b
    assert "ada" not in a["email"]
    assert a["email"] != other_key


def test_unknown_types_mask_every_value() -> None:
    assert mask_payload("thing.v1", {"who": "Bob", "n": 3}) == {"who": "B***", "n": 3}


def test_free_text_loses_email_addresses() -> None:
    assert (
        scrub_text("550 no mailbox ada@example.com here") == "550 no mailbox a***@example.com here"
    )
