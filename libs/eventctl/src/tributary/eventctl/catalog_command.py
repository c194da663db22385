"""``eventctl catalog``: the event catalog as a table, JSON, or a Mermaid flowchart.

Everything comes from ``contracts/catalog.yaml`` (``$TRIBUTARY_CONTRACTS_DIR`` or the packaged
copy). The flowchart draws every producer → the events exchange → every consumer, one edge
per pair of nodes labelled with the types that travel it:

- a service is a node named as the service; a foreign producer (``external_producers``) a
  node of its own, marked foreign;
- a type owned by ``runtime`` (``message.dead_lettered``: every service's runtime publishes
  it) is drawn from one node, ``runtime`` ("every service's runtime"), not from every service;
- commands are drawn through the exchange like events, marked ``(command)`` (the runtime
  sends them through the default exchange straight to the command queue).

:func:`flow_edges` reads the edges back out of any Mermaid flowchart (the README's too), so
a picture drawn by hand can be checked against :func:`catalog_edges`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tributary.contracts.catalog import RUNTIME, Catalog, CatalogError, load_catalog

EXCHANGE = "X"
"""The node of the events exchange."""
RUNTIME_NODE = "runtime"
EVERY_EVENT = "every event type"
"""A label that stands for every event type of the catalog (audit consumes them all)."""

Edge = tuple[str, str, str]
"""(from node, to node, type): a producer → ``X`` or ``X`` → a consumer."""


def node_id(name: str) -> str:
    """A Mermaid-safe node id: ``comments-app`` → ``comments_app``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def producer_nodes(cat: Catalog, type_name: str) -> tuple[str, ...]:
    spec = cat.type(type_name)
    if spec.owner == RUNTIME:
        return (RUNTIME_NODE,)
    return tuple(node_id(p) for p in spec.producers)


def catalog_edges(cat: Catalog) -> set[Edge]:
    """Every producer → exchange and exchange → consumer edge, one per type."""
    edges: set[Edge] = set()
    for spec in cat:
        for producer in producer_nodes(cat, spec.name):
            edges.add((producer, EXCHANGE, spec.name))
        for consumer in spec.consumers:
            edges.add((EXCHANGE, node_id(consumer), spec.name))
    return edges


# -- rendering --------------------------------------------------------------------------------


def _label(cat: Catalog, types: Iterable[str]) -> str:
    names = [f"{t} (command)" if cat.type(t).kind == "command" else t for t in sorted(types)]
    lines = [", ".join(names[i : i + 3]) for i in range(0, len(names), 3)]
    return '"' + ",<br/>".join(lines) + '"'


def mermaid(cat: Catalog) -> str:
    """The flowchart, as the body of a ```mermaid block."""
    out = ["flowchart LR", f'    {EXCHANGE}{{{{"tributary.events<br/>(topic exchange)"}}}}']
    for name in cat.services:
        out.append(f"    {node_id(name)}[{name}]")
    for name in sorted(cat.external_producers):
        out.append(f'    {node_id(name)}(["{name} (foreign)"])')
    if any(spec.owner == RUNTIME for spec in cat):
        out.append(f'    {RUNTIME_NODE}(["every service\'s runtime"])')
    grouped: dict[tuple[str, str], set[str]] = defaultdict(set)
    for source, target, type_name in catalog_edges(cat):
        grouped[(source, target)].add(type_name)
    # producers into the exchange first, then the exchange out to consumers
    for (source, target), types in sorted(
        grouped.items(), key=lambda kv: (kv[0][0] == EXCHANGE, kv[0])
    ):
        out.append(f"    {source} -->|{_label(cat, types)}| {target}")
    return "\n".join(out)


@dataclass(frozen=True)
class Row:
    type: str
    kind: str
    owner: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    versions: tuple[str, ...]
    pii: tuple[str, ...]
    description: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "kind": self.kind,
            "owner": self.owner,
            "producers": list(self.producers),
            "consumers": list(self.consumers),
            "versions": list(self.versions),
            "pii": list(self.pii),
            "description": self.description,
        }


def rows(cat: Catalog) -> list[Row]:
    found = []
    for spec in sorted(cat, key=lambda s: s.name):
        versions = sorted(spec.versions.values(), key=lambda v: v.version)
        found.append(
            Row(
                type=spec.name,
                kind=spec.kind,
                owner=spec.owner,
                producers=spec.producers,
                consumers=spec.consumers,
                versions=tuple(
                    f"v{v.version}" + ("" if v.status == "active" else f" ({v.status})")
                    for v in versions
                ),
                pii=tuple(f"v{v.version}: {', '.join(v.pii)}" for v in versions if v.pii),
                description=spec.description,
            )
        )
    return found


def table(cat: Catalog) -> str:
    head = ("TYPE", "KIND", "OWNER", "PRODUCERS", "CONSUMERS", "VERSIONS", "PII FIELDS")
    lines = [
        (
            r.type,
            r.kind,
            r.owner,
            "every service" if r.owner == RUNTIME else ", ".join(r.producers),
            ", ".join(r.consumers),
            ", ".join(r.versions),
            "; ".join(r.pii) or "-",
        )
        for r in rows(cat)
    ]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in [head, *lines]
    )


def as_json(cat: Catalog) -> str:
    return json.dumps(
        {
            "types": [r.as_dict() for r in rows(cat)],
            "external_producers": dict(sorted(cat.external_producers.items())),
            "edges": [list(e) for e in sorted(catalog_edges(cat))],
        },
        indent=2,
    )


# -- reading a flowchart back -----------------------------------------------------------------

_BLOCK = re.compile(r"```mermaid\n(.*?)```", re.DOTALL)
_NODE = r"([A-Za-z_][\w]*)(?:\s*(?:\(\[.*?\]\)|\[\(.*?\)\]|\{\{.*?\}\}|\[.*?\]|\(.*?\)))?"
_LINK = re.compile(rf"^\s*{_NODE}\s*(?:-->|-\.->|==>)\s*\|(.*?)\|\s*(.+?)\s*$")


def mermaid_blocks(markdown: str) -> list[str]:
    return _BLOCK.findall(markdown)


def _targets(text: str) -> list[str]:
    ids = []
    for part in text.split("&"):
        match = re.match(_NODE, part.strip())
        if match:
            ids.append(match.group(1))
    return ids


def exchange_node(flow: str) -> str | None:
    """The id of the node whose label names the events exchange."""
    match = re.search(r"([A-Za-z_]\w*)\s*\{\{\"?tributary\.events", flow)
    return match.group(1) if match else None


def label_types(label: str, known: Iterable[str], events: Iterable[str]) -> set[str]:
    """The catalog types a label names (``every event type``: all events)."""
    text = label.replace("<br/>", " ").replace('"', " ")
    found = {
        name for name in known if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w]|\.\w)", text)
    }
    if EVERY_EVENT in text:
        found |= set(events)
    return found


def flow_edges(flow: str, cat: Catalog) -> set[Edge]:
    """The (from, to, type) edges through the exchange a flowchart draws, by node id, with
    the exchange's node renamed :data:`EXCHANGE`."""
    exchange = exchange_node(flow) or EXCHANGE
    known = [spec.name for spec in cat]
    events = [spec.name for spec in cat if spec.kind == "event"]
    edges: set[Edge] = set()
    for line in flow.splitlines():
        match = _LINK.match(line)
        if not match:
            continue
        source, label, rest = match.groups()
        types = label_types(label, known, events)
        for target in _targets(rest):
            ends = [EXCHANGE if n == exchange else n for n in (source, target)]
            if EXCHANGE not in ends:
                continue
            edges.update((ends[0], ends[1], t) for t in types)
    return edges


# -- the command ------------------------------------------------------------------------------


def catalog_command(args: argparse.Namespace) -> int:
    try:
        cat = load_catalog(args.contracts)
    except (CatalogError, OSError, ValueError, yaml.YAMLError) as exc:
        print(f"eventctl: {exc}", file=sys.stderr)
        return 2
    if args.format == "mermaid":
        flow = mermaid(cat)
        print(f"```mermaid\n{flow}\n```" if args.fenced else flow)
    elif args.format == "json":
        print(as_json(cat))
    else:
        print(table(cat))
    return 0


def add_catalog_command(groups: Any) -> None:
    parser = groups.add_parser(
        "catalog",
        help="show the event catalog: a table, JSON, or a Mermaid flowchart",
        description="Render contracts/catalog.yaml: every type with its kind, owner, "
        "producers, consumers, versions and PII fields (table or json), or a Mermaid "
        "flowchart of producers -> the events exchange -> consumers, each edge labelled with "
        "the types it carries (mermaid).",
    )
    parser.add_argument(
        "--format", choices=("table", "mermaid", "json"), default="table", help="default: table"
    )
    parser.add_argument(
        "--contracts",
        type=Path,
        metavar="DIR",
        help="the contracts directory (default: $TRIBUTARY_CONTRACTS_DIR or the installed one)",
    )
    parser.add_argument(
        "--fenced", action="store_true", help="mermaid: inside a ```mermaid block (for Markdown)"
    )
    parser.set_defaults(handler=catalog_command)
