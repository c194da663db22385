"""JSON Schema validation of event payloads: strict for producers, tolerant for consumers."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
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


# -- the flat fast path ------------------------------------------------------------------------

_ROOT_KEYWORDS = frozenset(
    {"$schema", "$id", "title", "description", "type", "required", "properties"}
)
_FLAT_KEYWORDS = frozenset(
    {"type", "description", "pattern", "format", "minLength", "maxLength", "enum", "minimum"}
    | {"maximum"}
)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}

Rule = Callable[[Any], bool]
"""True when a value satisfies one keyword of a property."""


def _rule(keyword: str, value: Any, checker: FormatChecker) -> Rule | None:
    """The check of one keyword with jsonschema's semantics (a keyword that does not apply to
    the value's type holds); None for an annotation."""
    if keyword == "type":
        return _TYPES[value]
    if keyword == "pattern":
        compiled = re.compile(value)
        return lambda v: not isinstance(v, str) or compiled.search(v) is not None
    if keyword == "format":
        return lambda v: checker.conforms(v, value)
    if keyword == "minLength":
        return lambda v: not isinstance(v, str) or len(v) >= value
    if keyword == "maxLength":
        return lambda v: not isinstance(v, str) or len(v) <= value
    if keyword == "enum":
        return lambda v: isinstance(v, str) and v in value
    if keyword == "minimum":
        return lambda v: not _TYPES["number"](v) or not v < value  # NaN holds, as there
    if keyword == "maximum":
        return lambda v: not _TYPES["number"](v) or not v > value
    return None


def _flat(schema: Mapping[str, Any]) -> bool:
    """An object of scalar properties, open or closed (``additionalProperties: false``), with
    only the keywords :func:`_rule` knows (string enums only): the schemas :class:`FlatCheck`
    decides exactly."""
    if (
        schema.get("type") != "object"
        or not set(schema) - {"additionalProperties"} <= _ROOT_KEYWORDS
    ):
        return False
    if schema.get("additionalProperties", False) is not False:
        return False
    for prop in schema.get("properties", {}).values():
        keywords = {k for k in prop if not k.startswith("x-")}
        if not keywords <= _FLAT_KEYWORDS or prop.get("type") not in _TYPES:
            return False
        if "enum" in prop and not all(isinstance(v, str) for v in prop["enum"]):
            return False
    return True


class FlatCheck:
    """The schema of a flat payload, decided without jsonschema.

    Same verdict as :func:`validate` in the same mode (same field and rule for the first
    error) at a small part of its cost: unknown properties (strict mode), the required ones,
    and the type, pattern, format, length, enum and bounds of each, checked in the order
    jsonschema reports them. Patterns use Python's ``re`` and formats jsonschema's own
    checker, as the schema validator does (pydantic's regex engine and lax types differ, so
    the typed model alone is not the schema).
    """

    def __init__(self, routing_key: str, schema: Mapping[str, Any]) -> None:
        checker = FormatChecker()
        self.routing_key = routing_key
        self._required: tuple[str, ...] = tuple(schema.get("required", ()))
        self._known = frozenset(schema.get("properties", {}))
        keys = list(schema)
        self._closed = "additionalProperties" in schema
        # errors at the root come in the schema's keyword order
        self._unknown_first = self._closed and (
            "required" not in schema or keys.index("additionalProperties") < keys.index("required")
        )
        # jsonschema's errors are sorted by path: its first error is in the first property
        # by name; within a property, in the order of the schema's keywords
        self._properties: tuple[tuple[str, tuple[tuple[str, Any, Rule], ...]], ...] = tuple(
            (
                name,
                tuple(
                    (keyword, value, rule)
                    for keyword, value in prop.items()
                    if (rule := _rule(keyword, value, checker)) is not None
                ),
            )
            for name, prop in sorted(schema.get("properties", {}).items())
        )

    def __call__(self, data: Any) -> None:
        """Raise :class:`SchemaViolation` when ``data`` breaks the schema."""
        if not isinstance(data, dict):
            raise SchemaViolation(self.routing_key, "data", "type", "is not of type 'object'")
        if self._unknown_first:
            self._no_unknown(data)
        for name in self._required:
            if name not in data:
                raise SchemaViolation(self.routing_key, f"data.{name}", "required", "is required")
        if self._closed and not self._unknown_first:
            self._no_unknown(data)
        for name, rules in self._properties:
            if name not in data:
                continue
            value = data[name]
            for keyword, expected, rule in rules:
                if not rule(value):
                    raise SchemaViolation(
                        self.routing_key, f"data.{name}", keyword, _detail(keyword, expected)
                    )

    def _no_unknown(self, data: dict[Any, Any]) -> None:
        if data.keys() <= self._known:
            return
        extra = sorted(str(k) for k in data if k not in self._known)
        raise SchemaViolation(
            self.routing_key,
            f"data.{extra[0][:100]}",
            "additionalProperties",
            "is not allowed (unknown property)",
        )


def _detail(keyword: str, expected: Any) -> str:
    if keyword == "type":
        return f"is not of type {expected!r}"
    return f"violates {keyword} {expected!r}"[:500]


@cache
def flat_check(routing_key: str, mode: Mode = "tolerant") -> FlatCheck | None:
    """The fast check of ``routing_key``'s schema in ``mode`` (built once), or None when the
    schema is not flat (nested objects or arrays, other keywords): validate it in full."""
    schema = catalog().by_routing_key(routing_key).schema
    if mode == "tolerant":
        schema = _tolerant(schema)
    return FlatCheck(routing_key, schema) if _flat(schema) else None
