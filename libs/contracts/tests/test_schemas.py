"""The JSON Schemas under ``contracts/schemas/`` against the catalog and the payload models."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker, ValidationError

from libs.contracts.tests.samples import SAMPLES, sample
from tributary.contracts.catalog import VersionSpec, catalog
from tributary.contracts.envelope import SCHEMA_BASE
from tributary.contracts.events import PAYLOAD_TYPES, Payload, UnknownPayload, payload_type

VERSIONS = sorted(catalog().versions(), key=lambda v: v.routing_key)
ROUTING_KEYS = [v.routing_key for v in VERSIONS]

# The JSON Schema keywords a payload model's field has to agree on with its schema property.
_FACETS = (
    "type",
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "additionalProperties",
)
# Formats a model field carries in its Python type (datetime, UUID); email and uri stay ``str``.
_TYPED_FORMATS = {"date-time", "uuid"}


def _validator(spec: VersionSpec) -> Draft202012Validator:
    return Draft202012Validator(spec.schema, format_checker=FormatChecker())


def _facets(prop: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a property that a model field must match, normalised."""
    out = {key: prop[key] for key in _FACETS if key in prop}
    if out.get("format") not in _TYPED_FORMATS:
        out.pop("format", None)
    if out.get("minLength") == 0:
        del out["minLength"]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _facets(out["additionalProperties"])
    return out


def _model_property(model_schema: dict[str, Any], name: str) -> dict[str, Any]:
    """The model's JSON Schema of field ``name``, with an optional field's ``null`` dropped."""
    prop: dict[str, Any] = model_schema["properties"][name]
    if "anyOf" in prop:
        branches = [b for b in prop["anyOf"] if b != {"type": "null"}]
        assert len(branches) == 1, f"{name}: only `X | None` unions are supported"
        prop = branches[0]
    return prop


def _model_of(spec: VersionSpec) -> type[Payload]:
    model = PAYLOAD_TYPES.get(spec.routing_key)
    assert model is not None, f"no payload model for {spec.routing_key}"
    return model


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_every_catalog_version_has_a_schema_file_valid_under_draft_2020_12(
    spec: VersionSpec,
) -> None:
    assert spec.schema_path.is_file(), f"{spec.schema_path} is missing"
    assert spec.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(spec.schema)


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_every_schema_is_a_documented_closed_object_named_after_its_version(
    spec: VersionSpec,
) -> None:
    schema = spec.schema
    assert schema["$id"] == f"{SCHEMA_BASE}{spec.routing_key}.json"
    assert schema["title"] == f"{spec.type} v{spec.version}"
    assert schema["description"].strip()
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    required = schema["required"]
    properties = schema["properties"]
    assert len(required) == len(set(required)), "duplicate names in required"
    assert set(required) <= set(properties), "required names a property that does not exist"
    undocumented = [name for name, prop in properties.items() if not prop.get("description")]
    assert not undocumented, f"properties without a description: {undocumented}"


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_the_x_pii_marks_are_exactly_the_catalog_pii_list(spec: VersionSpec) -> None:
    marked = {name for name, prop in spec.schema["properties"].items() if prop.get("x-pii")}
    assert marked == set(spec.pii)


def test_every_format_the_schemas_use_is_enforced_by_the_format_checker() -> None:
    used: set[str] = set()
    for spec in VERSIONS:
        for prop in spec.schema["properties"].values():
            if "format" in prop:
                used.add(prop["format"])
    assert used, "no schema uses a format"
    assert used <= set(FormatChecker().checkers), "a format would be silently ignored"


def test_every_catalog_version_has_a_payload_model_and_every_model_a_catalog_version() -> None:
    assert set(PAYLOAD_TYPES) == set(ROUTING_KEYS)
    for spec in VERSIONS:
        model = payload_type(spec.routing_key)
        assert (model.event_type, model.version) == (spec.type, spec.version)
        assert model.routing_key == spec.routing_key


def test_an_unknown_routing_key_has_no_payload_model() -> None:
    with pytest.raises(UnknownPayload):
        payload_type("user.created.v99")
    assert issubclass(UnknownPayload, KeyError)


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_each_payload_model_agrees_with_its_schema_field_by_field(spec: VersionSpec) -> None:
    schema = spec.schema
    model = _model_of(spec)
    model_schema = model.model_json_schema()
    assert list(model.model_fields) == list(schema["properties"]), "field names or order differ"
    required_in_model = {name for name, f in model.model_fields.items() if f.is_required()}
    assert required_in_model == set(schema["required"])
    for name, prop in schema["properties"].items():
        field = model.model_fields[name]
        if not field.is_required():
            assert field.default is None, f"{name}: an optional field defaults to None"
        expected = _facets(prop)
        actual = _facets(_model_property(model_schema, name))
        assert actual == expected, f"{spec.routing_key}.{name}: model {actual} != schema {expected}"


def test_there_is_one_sample_per_catalog_version() -> None:
    assert set(SAMPLES) == set(ROUTING_KEYS)


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_the_sample_payload_is_valid_for_its_schema_and_its_model(spec: VersionSpec) -> None:
    data = sample(spec.routing_key)
    _validator(spec).validate(data)
    parsed = _model_of(spec).model_validate(data)
    assert set(parsed.model_dump(exclude_none=True)) == set(data)


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_a_model_dumped_as_json_is_valid_for_its_schema(spec: VersionSpec) -> None:
    parsed = _model_of(spec).model_validate(sample(spec.routing_key))
    _validator(spec).validate(parsed.model_dump(mode="json", exclude_none=True))


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_an_unknown_property_fails_the_schema_but_the_model_ignores_it(spec: VersionSpec) -> None:
    data = sample(spec.routing_key, unexpected="surprise")
    with pytest.raises(ValidationError) as excinfo:
        _validator(spec).validate(data)
    assert excinfo.value.validator == "additionalProperties"
    assert not hasattr(_model_of(spec).model_validate(data), "unexpected")


@pytest.mark.parametrize("spec", VERSIONS, ids=ROUTING_KEYS)
def test_a_sample_without_a_required_property_fails_the_schema(spec: VersionSpec) -> None:
    validator = _validator(spec)
    for name in spec.schema["required"]:
        with pytest.raises(ValidationError):
            validator.validate(sample(spec.routing_key, **{name: None}))


@pytest.mark.parametrize(
    ("routing_key", "field", "value"),
    [
        ("user.created.v2", "email", "not-an-email"),
        ("user.created.v2", "created_at", "yesterday"),
        ("user.created.v2", "created_at", "2026-01-01T00:00:00"),
        ("user.created.v2", "user_id", "ws_0123456789"),
        ("user.created.v2", "plan", "enterprise"),
        ("user.created.v2", "locale", "en_gb"),
        ("user.created.v2", "given_name", ""),
        ("payment.succeeded.v1", "amount_cents", 0),
        ("payment.succeeded.v1", "currency", "eur"),
        ("email.sent.v1", "message_id", "no-angle-brackets@example.com"),
        ("email.failed.v1", "permanent", "yes"),
        ("report.ready.v1", "url", "not a url"),
        ("email.send.v1", "request_id", "not-a-uuid"),
        ("email.send.v1", "variables", {"given_name": 42}),
    ],
)
def test_a_sample_with_a_bad_value_fails_the_schema(
    routing_key: str, field: str, value: Any
) -> None:
    spec = catalog().by_routing_key(routing_key)
    errors = list(_validator(spec).iter_errors(sample(routing_key, **{field: value})))
    assert errors, f"{field}={value!r} was accepted"
    assert {e.absolute_path[0] for e in errors} == {field}
