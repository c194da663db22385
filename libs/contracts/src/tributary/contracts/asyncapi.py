"""Generate ``contracts/asyncapi.yaml`` (AsyncAPI 3.0) from the catalog.

Run ``python -m tributary.contracts.asyncapi --write`` after editing the catalog; a test fails
while the committed document is stale.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from tributary.contracts.catalog import Catalog, load_catalog

EXCHANGE = "tributary.events"
HEADER = "# Generated from catalog.yaml by `python -m tributary.contracts.asyncapi --write`.\n"

_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents 1.0, structured mode, with Tributary's extensions.",
    "required": ["specversion", "id", "type", "source", "time", "data"],
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "type": {"type": "string", "description": "com.tributary.<routing key>"},
        "source": {"type": "string", "description": "/services/<producer>"},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"const": "application/json"},
        "dataschema": {"type": "string", "format": "uri"},
        "idempotencykey": {"type": "string"},
        "correlationid": {"type": "string"},
        "causationid": {"type": "string"},
        "traceparent": {"type": "string"},
        "tracestate": {"type": "string"},
        "data": {"type": "object"},
    },
}


def _queue_of(consumer: str, kind: str, type_name: str) -> str:
    return type_name if kind == "command" else f"{consumer}.events"


def render(cat: Catalog) -> str:
    """The AsyncAPI document for ``cat`` as YAML text (deterministic)."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in sorted(cat, key=lambda s: s.name):
        for v in sorted(spec.versions.values(), key=lambda v: v.version):
            key = v.routing_key
            schema = v.schema
            messages[key] = {
                "name": v.ce_type,
                "title": schema.get("title", key),
                "summary": spec.description,
                "contentType": "application/cloudevents+json",
                "x-status": v.status,
                **({"x-deprecated-since": v.deprecated_since} if v.deprecated_since else {}),
                "x-pii": list(v.pii),
                "payload": {
                    "allOf": [
                        {"$ref": "#/components/schemas/CloudEvent"},
                        {
                            "type": "object",
                            "properties": {
                                "type": {"const": v.ce_type},
                                "data": {"$ref": f"./{v.schema_path.relative_to(cat.root)}"},
                            },
                        },
                    ]
                },
                "bindings": {"amqp": {"deliveryMode": 2, "messageType": v.ce_type}},
            }
            channels[key] = {
                "address": key,
                "title": f"{spec.kind} {key}",
                "messages": {key: {"$ref": f"#/components/messages/{key}"}},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": EXCHANGE, "type": "topic", "durable": True},
                    }
                },
            }
            ref = {"$ref": f"#/channels/{key}"}
            msg = [{"$ref": f"#/channels/{key}/messages/{key}"}]
            for producer in spec.producers:  # the only broker users allowed to publish it
                operations[f"{producer}.send.{key}"] = {
                    "action": "send",
                    "title": f"{producer} publishes {key}",
                    "channel": ref,
                    "messages": msg,
                }
            for consumer in spec.consumers:
                operations[f"{consumer}.receive.{key}"] = {
                    "action": "receive",
                    "title": f"{consumer} consumes {key}",
                    "channel": ref,
                    "messages": msg,
                    "bindings": {"amqp": {"queue": _queue_of(consumer, spec.kind, spec.name)}},
                    "x-irreversible": spec.is_irreversible_for(consumer),
                }
    doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Tributary events",
            "version": "1.0.0",
            "description": "Every event and command of Tributary, generated from the catalog.",
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "local": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": {"CloudEvent": _ENVELOPE}, "messages": messages},
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite contracts/asyncapi.yaml")
    args = parser.parse_args(argv)
    cat = load_catalog()
    text = render(cat)
    target = cat.root / "asyncapi.yaml"
    if args.write:
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target.name}")
        return 0
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        print("contracts/asyncapi.yaml is stale: run `make contracts`", file=sys.stderr)
        return 1
    print("contracts/asyncapi.yaml is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
