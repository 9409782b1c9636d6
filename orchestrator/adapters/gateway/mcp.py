"""MCP inspection, as pure functions: JSON-RPC messages in, decisions and filtered answers out.

Every JSON-RPC method is decided. Protocol plumbing (PLUMBING: initialize, ping,
notifications, the list methods) passes; `tools/call` passes only for a tool the grant
names, with the argument constraints the policy set; `resources/read` only for a URI under
a granted prefix (and no dot segments or escaped separators), `prompts/get` only for a
granted prompt name; anything else (`sampling/...`, a method spelled in another case) is
refused. `tools/list` answers are cut down to the granted tools, so an agent never even
sees the rest, and the input schemas listed for those are kept: a call's arguments must
match its tool's schema as well as the grant's constraints. Batches are decided element by
element: one denied element refuses the batch, and the answer says which element was
refused and why. Anything that does not parse as JSON-RPC is refused on the way out and
dropped on the way back, never passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from orchestrator.core.grant import CompiledGrant

MAX_MCP_BODY = 1 << 20
DENIED_CODE = -32001  # a server-defined JSON-RPC error: refused by policy
# What any MCP session needs, whatever its grant: the handshake, liveness, notifications
# (client to server: initialized, cancelled, progress, roots changed) and the list methods
# (tools/list answers are filtered to the grant).
PLUMBING = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "logging/setLevel",
    }
)


class ToolSchemas:
    """The input schemas of a task's MCP tools, as their servers listed them (tools/list
    answers, on their way to the task). A call is checked against its tool's schema, on
    top of the grant's constraints; a tool whose schema the task never had listed is not
    called (every MCP client lists the tools it offers a model)."""

    MAX_TOOLS = 512

    def __init__(self) -> None:
        self._validators: dict[tuple[str, str], Any] = {}

    def learn(self, server: str, tools: list[Any]) -> None:
        for tool in tools:
            name, schema = tool.get("name"), tool.get("inputSchema")
            if not isinstance(name, str) or len(self._validators) >= self.MAX_TOOLS:
                continue
            validator = None  # a schema that is not one: calls to the tool are refused
            if isinstance(schema, dict):
                kind = validator_for(schema, default=Draft202012Validator)
                try:
                    kind.check_schema(schema)
                    validator = kind(schema)
                except SchemaError:
                    pass
            self._validators[(server, name)] = validator

    def problem(self, server: str, tool: str, arguments: dict[str, Any]) -> str | None:
        """Why these arguments may not go to `tool`, by its schema; None if they may."""
        if (server, tool) not in self._validators:
            return "its input schema is unknown: list the tools (tools/list) first"
        validator = self._validators[(server, tool)]
        if validator is None:
            return "its server listed an input schema that is not valid JSON Schema"
        error = best_match(validator.iter_errors(arguments))
        if error is None:
            return None
        where = "/".join(str(part) for part in error.absolute_path) or "the arguments"
        return f"arguments do not match its input schema at {where}: {error.message[:200]}"


@dataclass(frozen=True)
class Call:
    """One message of a request and the decision on it."""

    id: Any
    method: str
    tool: str | None
    allowed: bool
    rule: str
    reason: str


def _decide(
    grant: CompiledGrant, server: str, message: Any, schemas: ToolSchemas | None = None
) -> Call:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return Call(None, "?", None, False, "mcp-malformed", "not a JSON-RPC 2.0 message")
    method = message.get("method")
    ident = message.get("id")
    if method is None:  # a response or error the client sends back to the server
        return Call(ident, "(response)", None, True, f"mcp {server}", "client response")
    if not isinstance(method, str):
        return Call(ident, "?", None, False, "mcp-malformed", "method is not a string")
    if method in PLUMBING or method.startswith("notifications/"):
        return Call(ident, method, None, True, f"mcp {server}", "protocol plumbing")
    params = message.get("params")
    if method in ("resources/read", "prompts/get"):
        key = "uri" if method == "resources/read" else "name"
        what = params.get(key) if isinstance(params, dict) else None
        check = grant.check_read(server, method, what)
        return Call(ident, method, None, check.allowed, check.rule, check.reason)
    if method != "tools/call":
        why = f"method {method[:64]!r} is not granted"
        return Call(ident, method, None, False, "mcp-method", why)
    return _decide_call(grant, server, ident, params, schemas)


def _decide_call(
    grant: CompiledGrant, server: str, ident: Any, params: Any, schemas: ToolSchemas | None
) -> Call:
    """A tools/call: a granted tool, its arguments within the grant and its schema."""
    method = "tools/call"
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return Call(ident, method, None, False, "mcp-malformed", "tools/call without a tool name")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        return Call(
            ident, method, params["name"], False, "mcp-malformed", "arguments must be an object"
        )
    tool = params["name"]
    check = grant.check_tool(server, tool, arguments)
    if check.allowed and schemas is not None:
        problem = schemas.problem(server, tool, arguments)
        if problem is not None:
            return Call(ident, method, tool, False, check.rule, f"tool {server}/{tool}: {problem}")
    return Call(ident, method, tool, check.allowed, check.rule, check.reason)


def inspect_request(
    grant: CompiledGrant, server: str, body: bytes, schemas: ToolSchemas | None = None
) -> tuple[list[Call], bool]:
    """Decide every message of a request body; (decisions, whether it was a batch). With
    `schemas`, a tool call is also checked against its tool's listed input schema."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return [Call(None, "?", None, False, "mcp-malformed", "body is not JSON")], False
    if isinstance(document, list):
        if not document:
            return [Call(None, "?", None, False, "mcp-malformed", "empty batch")], True
        return [_decide(grant, server, item, schemas) for item in document], True
    return [_decide(grant, server, document, schemas)], False


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


def filter_message(
    grant: CompiledGrant, server: str, message: Any, schemas: ToolSchemas | None = None
) -> Any:
    """A server message with any tools/list result cut down to the granted tools (whose
    input schemas `schemas` learns)."""
    if isinstance(message, list):
        return [filter_message(grant, server, item, schemas) for item in message]
    if not isinstance(message, dict):
        return message
    result = message.get("result")
    if isinstance(result, dict) and isinstance(result.get("tools"), list):
        allowed = grant.tools_of(server)
        kept = [t for t in result["tools"] if isinstance(t, dict) and t.get("name") in allowed]
        if schemas is not None:
            schemas.learn(server, kept)
        return {**message, "result": {**result, "tools": kept}}
    return message


def filter_json_body(
    grant: CompiledGrant, server: str, body: bytes, schemas: ToolSchemas | None = None
) -> bytes:
    """A JSON answer with its tool lists filtered; one that does not parse is dropped."""
    if not body.strip():
        return body
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return b""
    return json.dumps(filter_message(grant, server, document, schemas)).encode()


class EventStreamFilter:
    """Filters a text/event-stream as it flows, one whole event at a time, parsed as the
    HTML server-sent events grammar says: lines end in CRLF, LF or CR; an event ends at a
    blank line; its `data:` lines are joined with newlines (one optional space after the
    colon dropped). An event's data must be JSON-RPC to pass (filtered); one that does not
    parse is dropped. Comments and `event:`, `id:`, `retry:` fields pass with their event."""

    def __init__(
        self, grant: CompiledGrant, server: str, schemas: ToolSchemas | None = None
    ) -> None:
        self.grant, self.server, self.schemas = grant, server, schemas
        self._pending = b""
        self._fields: list[bytes] = []
        self._data: list[bytes] | None = None

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        while True:
            line, ending = _split_line(self._pending)
            if ending is None:
                return bytes(out)
            self._pending = self._pending[len(line) + ending :]
            out += self._line(line)

    def finish(self) -> bytes:
        """What is left at the end of the stream: an unterminated event is dropped."""
        self._pending, self._fields, self._data = b"", [], None
        return b""

    def _line(self, line: bytes) -> bytes:
        if line:
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data = [*(self._data or []), value[1:] if value[:1] == b" " else value]
            else:
                self._fields.append(line)
            return b""
        fields, data = self._fields, self._data
        self._fields, self._data = [], None
        if data is None:
            return b"".join(f + b"\n" for f in fields) + b"\n" if fields else b""
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError):
            return b""  # not JSON: dropped, with the fields that belonged to it
        filtered = json.dumps(
            filter_message(self.grant, self.server, message, self.schemas)
        ).encode()
        return b"".join(f + b"\n" for f in fields) + b"data: " + filtered + b"\n\n"


def _split_line(buffer: bytes) -> tuple[bytes, int | None]:
    """The first line of `buffer` and the length of its ending (None: no whole line yet; a
    CR at the very end may be the first half of a CRLF)."""
    for i, byte in enumerate(buffer):
        if byte == 0x0A:
            return buffer[:i], 1
        if byte == 0x0D:
            if i + 1 == len(buffer):
                return buffer, None
            return buffer[:i], 2 if buffer[i + 1] == 0x0A else 1
    return buffer, None
