"""A task's trace as the rows of a waterfall: each span at its depth in the tree, placed on
one time axis. The CLI draws it in characters, the console in SVG; both from these rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    name: str
    depth: int
    begin: float  # where the span starts on the axis, 0..1
    length: float  # how much of the axis it takes, 0..1
    ms: float
    error: bool
    detail: str  # why it failed, or the egress decision and its rule
    host: str = ""  # the machine it ran on (a trace crosses the API's and the worker's)


def across_hosts(found: list[Row]) -> bool:
    """Whether the rows come from more than one machine (then a view names each row's)."""
    return len({row.host for row in found}) > 1


def rows(spans: list[dict[str, Any]]) -> list[Row]:
    """The spans (as `airlock trace --json` gives them) in tree order, parents first."""
    if not spans:
        return []
    ids = {span["span_id"] for span in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    start = min(span["start"] for span in spans)
    total = max(max(span["end"] or span["start"] for span in spans) - start, 1)
    found: list[Row] = []

    def add(span: dict[str, Any], depth: int) -> None:
        end = span["end"] or span["start"]
        attrs = span.get("attributes") or {}
        detail = span.get("status_description") or ""
        if attrs.get("airlock.decision") in ("allow", "deny"):
            detail = f"{attrs['airlock.decision']} ({attrs.get('airlock.rule', '')}) {detail}"
        found.append(
            Row(
                name=span["name"],
                depth=depth,
                begin=(span["start"] - start) / total,
                length=(end - span["start"]) / total,
                ms=(end - span["start"]) / 1e6,
                error=span.get("status") == "ERROR",
                detail=detail.strip(),
                host=span.get("host") or "",
            )
        )
        for child in children.get(span["span_id"], []):
            add(child, depth + 1)

    for root in children.get(None, []):
        add(root, 0)
    return found
