"""MCP inspection, as pure functions: JSON-RPC messages in, decisions and filtered answers out.

A task may call only the tools its grant names, with the argument constraints the policy
set; `tools/list` answers are cut down to those tools, so an agent never even sees the rest.
Batches are decided element by element: one denied element refuses the batch, and the
answer says which element was refused and why. Anything that does not parse as JSON-RPC
is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from orchestrator.core.grant import CompiledGrant

MAX_MCP_BODY = 1 << 20
DENIED_CODE = -32001  # a server-defined JSON-RPC error: refused by policy


@dataclass(frozen=True)
class Call:
    """One message of a request and the decision on it."""

    id: Any
    method: str
    tool: str | None
    allowed: bool
    rule: str
    reason: str


def _decide(grant: CompiledGrant, server: str, message: Any) -> Call:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return Call(None, "?", None, False, "mcp-malformed", "not a JSON-RPC 2.0 message")
    method = message.get("method")
    ident = message.get("id")
    if method is None:  # a response or error the client sends back to the server
        return Call(ident, "(response)", None, True, f"mcp {server}", "client response")
    if not isinstance(method, str):
        return Call(ident, "?", None, False, "mcp-malformed", "method is not a string")
    if method != "tools/call":
        return Call(ident, method, None, True, f"mcp {server}", "not a tool call")
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return Call(ident, method, None, False, "mcp-malformed", "tools/call without a tool name")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        return Call(
            ident, method, params["name"], False, "mcp-malformed", "arguments must be an object"
        )
    check = grant.check_tool(server, params["name"], arguments)
    return Call(ident, method, params["name"], check.allowed, check.rule, check.reason)


def inspect_request(grant: CompiledGrant, server: str, body: bytes) -> tuple[list[Call], bool]:
    """Decide every message of a request body; (decisions, whether it was a batch)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return [Call(None, "?", None, False, "mcp-malformed", "body is not JSON")], False
    if isinstance(document, list):
        if not document:
            return [Call(None, "?", None, False, "mcp-malformed", "empty batch")], True
        return [_decide(grant, server, item) for item in document], True
    return [_decide(grant, server, document)], False


def refusal_body(calls: list[Call], batch: bool) -> bytes:
    """JSON-RPC errors for a refused request: the denied elements say why."""
    errors = []
    for call in calls:
        reason = call.reason if not call.allowed else "not sent: another element was refused"
        errors.append(
            {
                "jsonrpc": "2.0",
                "id": call.id,
                "error": {
                    "code": DENIED_CODE,
                    "message": f"denied by airlock: {reason}",
                    "data": {"rule": call.rule, "tool": call.tool},
                },
            }
        )
    return json.dumps(errors if batch else errors[0]).encode()


def filter_message(grant: CompiledGrant, server: str, message: Any) -> Any:
    """A server message with any tools/list result cut down to the granted tools."""
    if isinstance(message, list):
        return [filter_message(grant, server, item) for item in message]
    if not isinstance(message, dict):
        return message
    result = message.get("result")
    if isinstance(result, dict) and isinstance(result.get("tools"), list):
        allowed = grant.tools_of(server)
        kept = [t for t in result["tools"] if isinstance(t, dict) and t.get("name") in allowed]
        return {**message, "result": {**result, "tools": kept}}
    return message


def filter_json_body(grant: CompiledGrant, server: str, body: bytes) -> bytes:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return json.dumps(filter_message(grant, server, document)).encode()


class EventStreamFilter:
    """Filters a text/event-stream as it flows, one complete line at a time."""

    def __init__(self, grant: CompiledGrant, server: str) -> None:
        self.grant, self.server = grant, server
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return b"".join(self._line(line) + b"\n" for line in lines)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return self._line(rest) if rest else b""

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(b"data:"):
            return line
        try:
            message = json.loads(line[5:].strip())
        except (ValueError, UnicodeDecodeError):
            return line
        return b"data: " + json.dumps(filter_message(self.grant, self.server, message)).encode()
