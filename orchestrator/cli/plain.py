"""Output without rich, for the command that must answer fastest (`airlock status`).

rich costs about 50 ms to import; a key/value listing needs none of it. Colours follow the
usual rules (a terminal, NO_COLOR, FORCE_COLOR); long values wrap at words to the terminal's
width (piped, they stay on one line); text a task controls is printed as text, its control
characters made visible, so neither markup nor escape sequences in it reach the terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, TextIO

Segment = tuple[str, str]  # (text, style); style "" is plain
UNWRAPPED = 1 << 20  # the width of a line that is not wrapped
SGR = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "yellow",
    "rejected": "red",
    "running": "cyan",
}
STATUS_FIELDS = (
    "id",
    "state",
    "reason",
    "exit_code",
    "agent",
    "submitter",
    "on_behalf_of",
    "queue",
    "created_at",
    "started_at",
    "finished_at",
    "container_id",
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Control characters (ESC, CR, BEL, C1 ...) as their escapes; tabs become spaces."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text).replace("\t", "    ")


def colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def wrap(segments: list[Segment], width: int) -> list[list[Segment]]:
    """Lines of at most `width` characters, broken at spaces where one is near, else folded."""
    text = "".join(t for t, _ in segments)
    styles = [style for t, style in segments for _ in t]
    lines: list[list[Segment]] = []
    for start, end in _breaks(text, max(width, 8)):
        line: list[Segment] = []
        for i in range(start, end):
            if line and line[-1][1] == styles[i]:
                line[-1] = (line[-1][0] + text[i], styles[i])
            else:
                line.append((text[i], styles[i]))
        lines.append(line)
    return lines or [[]]


def _breaks(text: str, width: int) -> list[tuple[int, int]]:
    spans, start = [], 0
    while start < len(text):
        newline = text.find("\n", start, start + width + 1)
        if newline >= 0:
            spans.append((start, newline))
            start = newline + 1
            continue
        end = len(text)
        if end - start > width:
            space = text.rfind(" ", start, start + width + 1)
            end = space if space > start else start + width
        spans.append((start, end))
        start = end
        while start < len(text) and text[start] == " ":
            start += 1
    return spans


class KeyValues:
    """Two columns: a bold name and a value that wraps under itself."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, list[Segment]]] = []

    def add(self, name: str, *segments: Segment) -> None:
        self.rows.append((name, [(visible(text), style) for text, style in segments]))

    def write(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        styled = colour(stream)
        name_width = max((len(name) for name, _ in self.rows), default=0)
        width = line_width(stream) - name_width - 2
        out = []
        for name, segments in self.rows:
            for i, line in enumerate(wrap(segments, width)):
                label = (name if i == 0 else "").ljust(name_width)
                cells = [_paint(label, "bold", styled), "  "]
                cells += [_paint(text, style, styled) for text, style in line]
                out.append("".join(cells).rstrip())
        stream.write("\n".join(out) + "\n")


def unwrapped(stream: TextIO) -> bool:
    """Whether output to `stream` goes unwrapped: piped to grep or a file (no terminal, and
    no width in COLUMNS), where a value or a table row must stay on its line."""
    return not (os.environ.get("COLUMNS", "").isdigit() or stream.isatty())


def line_width(stream: TextIO) -> int:
    """The terminal's width when `stream` is one (or COLUMNS says); else no limit."""
    return UNWRAPPED if unwrapped(stream) else shutil.get_terminal_size((100, 24)).columns


def _paint(text: str, style: str, styled: bool) -> str:
    if not styled or not style or not text.strip():
        return text
    return f"\x1b[{SGR[style]}m{text}\x1b[0m"


def _checked(verified: Any) -> Segment:
    return ("revoked, checked", "green") if verified else ("NOT verified", "red")


def revocation_lines(receipt: dict[str, Any]) -> list[list[Segment]]:
    """The revocation receipt, one credential a line, each with its check."""
    verdict = ("verified", "green") if receipt.get("verified") else ("NOT verified", "red")
    lines = [[verdict] + ([(f": {receipt['error']}", "")] if receipt.get("error") else [])]
    token = receipt.get("token")
    if token:
        accessor = str(token.get("accessor", ""))[:12]
        lines.append([(f"vault token {accessor}…: ", ""), _checked(token.get("verified"))])
    for lease in receipt.get("leases") or []:
        lines.append([(f"lease {lease.get('id', '')}: ", ""), _checked(lease.get("verified"))])
    jwt = receipt.get("jwt")
    if jwt:
        state = ("invalidated", "") if jwt.get("invalidated") else ("still valid", "red")
        lines.append([(f"task jwt {jwt.get('jti', '')}: ", ""), state])
    if "endpoint_removed" in receipt:
        removed = ("removed", "") if receipt["endpoint_removed"] else ("left", "red")
        lines.append([("endpoint socket: ", ""), removed])
    return lines


def status(status: dict[str, Any]) -> KeyValues:
    """A task's record as people read it."""
    table = KeyValues()
    for name in STATUS_FIELDS:
        value = status.get(name)
        if value is not None:
            style = STATE_STYLE.get(str(value), "dim") if name == "state" else ""
            table.add(name, (str(value), style))
    for item in status.get("output") or []:
        table.add("output", (f"{item['name']} ({item['size']} bytes)", ""))
    grant = status.get("grant")
    if grant:
        policy = status.get("policy_version")
        table.add("grant", (f"{status.get('grant_hash')} (policy {policy})", ""))
        table.add(
            "",
            (
                f"image {grant['image']}, runtime {grant['runtime']}, "
                f"timeout {grant['timeout_s']}s, limits {grant['limits']}",
                "",
            ),
        )
        for rule in grant["egress"]:
            table.add("", (f"egress {rule['host']} ports {rule['ports']} {rule['methods']}", ""))
        for tool in grant["tools"]:
            table.add("", (f"tool {tool['server']}/{tool['tool']}", ""))
        for secret in grant["secrets"]:
            table.add("", (f"secret {secret['name']} ({secret['kind']})", ""))
    receipt = status.get("revocation")
    if receipt:
        for i, line in enumerate(revocation_lines(receipt)):
            table.add("revocation" if i == 0 else "", *line)
    return table
