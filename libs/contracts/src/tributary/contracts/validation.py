"""JSON Schema validation of event payloads: strict for producers, tolerant for consumers."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema import ValidationError as _JsonSchemaError

from tributary.contracts.catalog import CatalogError, catalog

Mode = Literal["strict", "tolerant"]


class SchemaViolation(ValueError):
    """A payload breaks its schema; ``field`` and ``rule`` say where and which keyword."""

    def __init__(self, routing_key: str, field: str, rule: str, detail: str) -> None:
        self.routing_key = routing_key
        self.field = field
        self.rule = rule
        self.detail = detail
        super().__init__(f"{routing_key}: {field}: {detail} ({rule})")


def _tolerant(schema: Any) -> Any:
    """A copy of ``schema`` that ignores unknown properties at every level."""
    if isinstance(schema, dict):
        return {
            key: _tolerant(value)
            for key, value in schema.items()
            if not (key == "additionalProperties" and value is False)
        }
    if isinstance(schema, list):
        return [_tolerant(item) for item in schema]
    return copy.copy(schema)


@cache
def validator_for(routing_key: str, mode: Mode) -> Draft202012Validator:
    """The compiled validator of ``user.created.v1`` in ``mode`` (built once)."""
    schema = catalog().by_routing_key(routing_key).schema
    if mode == "tolerant":
        schema = _tolerant(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def _describe(error: _JsonSchemaError) -> tuple[str, str]:
    path = ["data", *(str(p) for p in error.absolute_path)]
    detail = error.message
    if error.validator == "required" and isinstance(error.instance, Mapping):
        required: list[str] = list(error.validator_value)  # type: ignore[arg-type]
        missing = [p for p in required if p not in error.instance]
        if missing:
            path.append(str(missing[0]))
            detail = "is required"
    elif error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        allowed = set(schema.get("properties", {}))
        extra = sorted(str(k) for k in error.instance if k not in allowed)
        if extra:
            path.append(extra[0][:100])
            detail = "is not allowed (unknown property)"
    elif error.validator == "type":
        detail = f"is not of type {error.validator_value!r}"
    else:
        # Say which rule failed without echoing the value (it may be PII).
        detail = f"violates {error.validator} {error.validator_value!r}"[:500]
    return ".".join(path), detail


def validate(routing_key: str, data: Any, mode: Mode = "strict") -> None:
    """Raise :class:`SchemaViolation` (first error, by path) when ``data`` breaks its schema.

    Whatever ``data`` holds, nothing else is raised: data too deep or too odd to evaluate
    (jsonschema's messages ``repr`` the value) is a violation of rule ``unvalidatable``.
    """
    try:
        validator = validator_for(routing_key, mode)
    except CatalogError as exc:
        raise SchemaViolation(str(routing_key), "type", "catalog", str(exc)) from None
    try:
        errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        if not errors:
            return
        field, detail = _describe(errors[0])
    except (RecursionError, TypeError, ValueError) as exc:
        # RecursionError: nested deeper than repr() goes; ValueError: an int too long to print
        raise SchemaViolation(
            routing_key, "data", "unvalidatable", f"cannot be evaluated ({type(exc).__name__})"
        ) from None
    raise SchemaViolation(routing_key, field, str(errors[0].validator), detail)
