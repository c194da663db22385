"""The README's flow picture agrees with the catalog.

The picture (the first ```mermaid block of README.md) is drawn by hand and has more than the
catalog knows (the HTTP client, the payment provider, SMTP, webhooks), so this checks that it
contains the catalog's edges, not that it equals them. ``eventctl catalog --format mermaid``
draws the catalog's own flowchart; every edge of it must be in the README picture:

- every producer → exchange edge, labelled with the type; the exchange is the node whose label
  names ``tributary.events``; services are nodes named as the service;
- a foreign producer's types may come from one node for all foreign producers (a node whose
  label says "foreign producers") instead of a node of its own;
- a type every service's runtime publishes (owner ``runtime``: ``message.dead_lettered``) is
  drawn once, from any one node (a note such as "every service's runtime"), not from each
  service;
- every exchange → consumer edge, labelled with the type; a label "every event type" carries
  every event of the catalog (audit);
- commands are drawn through the exchange like events (their label may add "command").

On a failure the message lists the missing edges and the Mermaid lines that would add them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tributary.contracts.catalog import load_catalog
from tributary.eventctl.catalog_command import (
    EXCHANGE,
    RUNTIME_NODE,
    Edge,
    catalog_edges,
    flow_edges,
    mermaid_blocks,
    node_id,
)

ROOT = Path(__file__).resolve().parents[1]


def missing_edges(readme: str) -> list[Edge]:
    """The catalog's edges the first flowchart of ``readme`` (Markdown) does not draw."""
    cat = load_catalog(ROOT / "contracts")
    blocks = mermaid_blocks(readme)
    assert blocks, "README.md has no ```mermaid block"
    flow = blocks[0]
    drawn = flow_edges(flow, cat)
    foreign = re.search(r"([A-Za-z_]\w*)\s*\(\[\s*\"?foreign producers", flow)
    foreign_node = foreign.group(1) if foreign else None
    external = {node_id(p) for p in cat.external_producers}

    missing: list[Edge] = []
    for source, target, type_name in sorted(catalog_edges(cat)):
        if target != EXCHANGE:
            found = (EXCHANGE, target, type_name) in drawn
        elif source == RUNTIME_NODE:
            found = any(d == EXCHANGE and t == type_name for _, d, t in drawn)
        elif source in external:
            found = (source, EXCHANGE, type_name) in drawn or (
                foreign_node is not None and (foreign_node, EXCHANGE, type_name) in drawn
            )
        else:
            found = (source, EXCHANGE, type_name) in drawn
        if not found:
            missing.append((source, target, type_name))
    return missing


def suggested_lines(missing: list[Edge]) -> list[str]:
    """Mermaid lines that would draw the missing edges (one per pair of nodes)."""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for source, target, type_name in missing:
        grouped[(source, target)].append(type_name)
    lines = []
    for (source, target), types in sorted(grouped.items()):
        if source == RUNTIME_NODE:
            source = f'{RUNTIME_NODE}(["every service\'s runtime"])'
        lines.append(f"    {source} -->|{', '.join(types)}| {target}")
    return lines


def test_every_catalog_edge_is_in_the_readme_flow_picture() -> None:
    missing = missing_edges((ROOT / "README.md").read_text(encoding="utf-8"))
    assert not missing, (
        "the README flow picture lacks these catalog edges (from, to, type):\n"
        + "\n".join(f"  {e}" for e in missing)
        + "\nadd to its ```mermaid block, e.g.:\n"
        + "\n".join(suggested_lines(missing))
    )
