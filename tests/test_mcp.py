"""MCP inspection as pure functions: every JSON-RPC method decided, argument rules that no
spelling of a path escapes, and server answers parsed as the SSE grammar says, with
anything unparsable dropped rather than passed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.adapters.gateway.mcp import (
    EventStreamFilter,
    ToolSchemas,
    filter_json_body,
    inspect_request,
)
from tests.grants import compiled_grant

READS = [
    {
        "server": "files",
        "url": "http://f/mcp",
        "resources": ["docs://manual/"],
        "prompts": ["summarize"],
    }
]
GRANT = compiled_grant(
    egress=[],
    tools=[
        {
            "server": "files",
            "url": "http://f/mcp",
            "tool": "read_file",
            "args": {"path": {"prefix": "/docs/", "max_length": 40}},
        },
        {
            "server": "files",
            "url": "http://f/mcp",
            "tool": "tag",
            "args": {"labels": {"max_length": 2}, "meta": {"max_length": 20}},
        },
    ],
    mcp_reads=READS,
)


def message(method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def decided(body: bytes) -> tuple[bool, str, str]:
    [call], _ = inspect_request(GRANT, "files", body)
    return call.allowed, call.rule, call.reason


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        ("initialize", True),
        ("ping", True),
        ("notifications/initialized", True),
        ("notifications/cancelled", True),
        ("tools/list", True),
        ("resources/list", True),
        ("prompts/list", True),
        ("resources/read", False),  # of a URI no prefix grants
        ("prompts/get", False),  # of a prompt no grant names
        ("sampling/createMessage", False),
        ("completion/complete", False),
        ("Tools/Call", False),
        ("TOOLS/LIST", False),
        ("tools/call ", False),
        ("x", False),
    ],
)
def test_every_method_is_decided(method: str, allowed: bool) -> None:
    got, rule, _ = decided(message(method, uri="file:///etc/passwd", name="p"))
    assert got is allowed, (method, rule)
    if not allowed:
        assert rule in ("mcp-method", "default-deny")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/docs/readme", True),
        ("/docs/a/b.txt", True),
        ("/etc/passwd", False),
        ("/docs/../etc/passwd", False),
        ("/docs/./../etc/passwd", False),
        ("/docs/%2e%2e/etc/passwd", False),
        ("/docs/%2E%2E%2Fetc", False),
        ("/docs/..\\etc\\passwd", False),
        ("/docs/a\x00", False),
        ("/docs/" + "a" * 40, False),
        (["/docs/readme"], False),
    ],
)
def test_path_arguments_cannot_climb_out_of_their_prefix(path: Any, allowed: bool) -> None:
    got, _, reason = decided(message("tools/call", name="read_file", arguments={"path": path}))
    assert got is allowed, reason


@pytest.mark.parametrize(
    ("method", "params", "allowed"),
    [
        ("resources/read", {"uri": "docs://manual/intro.md"}, True),
        ("resources/read", {"uri": "docs://manual/"}, True),
        ("resources/read", {"uri": "docs://secret/keys"}, False),
        ("resources/read", {"uri": "docs://manual/../secret/keys"}, False),
        ("resources/read", {"uri": "docs://manual/%2e%2e/secret"}, False),
        ("resources/read", {"uri": ["docs://manual/intro.md"]}, False),
        ("resources/read", {}, False),
        ("prompts/get", {"name": "summarize"}, True),
        ("prompts/get", {"name": "exfiltrate"}, False),
        ("prompts/get", {"name": "Summarize"}, False),
    ],
)
def test_resources_and_prompts_only_as_granted(
    method: str, params: dict[str, Any], allowed: bool
) -> None:
    got, _, reason = decided(message(method, **params))
    assert got is allowed, reason


def test_max_length_holds_for_every_type() -> None:
    def tag(**arguments: Any) -> bool:
        return decided(message("tools/call", name="tag", arguments=arguments))[0]

    assert tag(labels=["a", "b"], meta={"k": "v"})
    assert not tag(labels=["a", "b", "c"])  # items of an array
    assert not tag(meta={"key": "a long enough value"})  # characters of an object's JSON
    assert not tag(meta=10**30)  # digits of a number
    assert tag(labels="ab") and not tag(labels="abc")


TOOLS = {
    "jsonrpc": "2.0",
    "id": 1,
    "result": {"tools": [{"name": "read_file"}, {"name": "shell"}, {"name": "tag"}]},
}


def names(event_data: bytes) -> list[str]:
    return [t["name"] for t in json.loads(event_data)["result"]["tools"]]


def test_event_streams_are_parsed_as_the_sse_grammar_says() -> None:
    stream = EventStreamFilter(GRANT, "files")
    text = json.dumps(TOOLS, indent=1)  # a message spread over many data: lines
    raw = "event: message\r\nid: 7\r\n" + "".join(f"data: {line}\r\n" for line in text.split("\n"))
    raw += "\r\n"
    out = b"".join(stream.feed(raw[i : i + 5].encode()) for i in range(0, len(raw), 5))
    out += stream.finish()
    lines = out.decode().split("\n")
    assert lines[:2] == ["event: message", "id: 7"]
    assert names(lines[2].removeprefix("data: ").encode()) == ["read_file", "tag"]
    assert "shell" not in out.decode()


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "shell"}\n\n',
        b"data: not json at all\n\n",
        b'data: {"jsonrpc": "2.0",\rdata: "result": {"tools": [{"name": "shell"}]}}\r\r',
    ],
)
def test_what_does_not_parse_is_dropped_never_passed(event: bytes) -> None:
    stream = EventStreamFilter(GRANT, "files")
    out = stream.feed(event) + stream.finish()
    assert b"shell" not in out


def test_an_unterminated_event_is_dropped() -> None:
    stream = EventStreamFilter(GRANT, "files")
    assert stream.feed(b"data: " + json.dumps(TOOLS).encode()) == b""
    assert stream.finish() == b""


def test_json_answers_are_filtered_and_garbage_dropped() -> None:
    assert names(filter_json_body(GRANT, "files", json.dumps(TOOLS).encode())) == [
        "read_file",
        "tag",
    ]
    assert filter_json_body(GRANT, "files", b'{"result": {"tools": [{"name": "shell"}') == b""
    assert filter_json_body(GRANT, "files", b"") == b""


LISTED = {
    "jsonrpc": "2.0",
    "id": 9,
    "result": {
        "tools": [
            {
                "name": "read_file",
                "inputSchema": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
                    "required": ["path"],
                    "additionalProperties": False,
                },
            },
            {"name": "tag", "inputSchema": {"type": "nonsense"}},  # not a schema at all
            {"name": "shell", "inputSchema": {"type": "object"}},  # not granted: never kept
        ]
    },
}


def schema_decided(schemas: ToolSchemas, tool: str, **arguments: Any) -> tuple[bool, str]:
    [call], _ = inspect_request(
        GRANT, "files", message("tools/call", name=tool, arguments=arguments), schemas
    )
    return call.allowed, call.reason


def test_arguments_must_match_the_schema_the_server_listed() -> None:
    """On top of the grant's constraints: the tool's own input schema, as its server listed
    it to the task (learned from the filtered tools/list answer, JSON or event stream)."""
    schemas = ToolSchemas()
    unknown = schema_decided(schemas, "read_file", path="/docs/a")
    assert unknown == (
        False,
        "tool files/read_file: its input schema is unknown: list the tools (tools/list) first",
    )
    listed = filter_json_body(GRANT, "files", json.dumps(LISTED).encode(), schemas)
    assert [t["name"] for t in json.loads(listed)["result"]["tools"]] == ["read_file", "tag"]
    assert schema_decided(schemas, "read_file", path="/docs/a", lines=3) == (True, "granted")
    wrong_type = schema_decided(schemas, "read_file", path="/docs/a", lines="3")
    assert not wrong_type[0] and "at lines: '3' is not of type 'integer'" in wrong_type[1]
    extra = schema_decided(schemas, "read_file", path="/docs/a", command="rm -rf /")
    assert not extra[0] and "Additional properties are not allowed" in extra[1]
    missing = schema_decided(schemas, "read_file")
    assert not missing[0]  # the grant's prefix rule refuses first: no path at all
    broken = schema_decided(schemas, "tag", labels=["a"])
    assert broken == (
        False,
        "tool files/tag: its server listed an input schema that is not valid JSON Schema",
    )


def test_schemas_are_learned_from_event_streams_too() -> None:
    schemas = ToolSchemas()
    stream = EventStreamFilter(GRANT, "files", schemas)
    stream.feed(b"event: message\ndata: " + json.dumps(LISTED).encode() + b"\n\n")
    assert schema_decided(schemas, "read_file", path="/docs/a") == (True, "granted")
