"""The task spec refuses bad input field by field and never crashes on any input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core.spec import TaskSpec, json_schema, parse, parse_text
from orchestrator.errors import InvalidSpec

VALID = {"agent": "researcher", "command": ["python3", "-c", "print(1)"]}


def test_unset_fields_are_left_to_the_policy() -> None:
    spec = parse(VALID)
    assert spec.timeout_s is None and spec.limits.memory is None
    assert spec.scopes.egress is None and spec.scopes.tools is None
    assert spec.command == ("python3", "-c", "print(1)")


def test_scopes() -> None:
    scopes = {
        "egress": [
            {"host": "*.example.com", "ports": [443], "methods": ["GET"], "paths": ["/v1/"]}
        ],
        "tools": ["git/clone"],
        "secrets": ["db"],
    }
    spec = parse({**VALID, "scopes": scopes})
    assert spec.scopes.egress is not None and spec.scopes.egress[0].host == "*.example.com"
    assert spec.scopes.tools == ("git/clone",)


@pytest.mark.parametrize(
    ("memory", "expected"),
    [("512m", 512 << 20), ("1g", 1 << 30), ("64MiB", 64 << 20), (33554432, 32 << 20)],
)
def test_memory_sizes(memory: object, expected: int) -> None:
    assert parse({**VALID, "limits": {"memory": memory}}).limits.memory == expected


def test_spec_is_immutable() -> None:
    spec = parse(VALID)
    with pytest.raises(Exception, match="frozen"):
        spec.agent = "other"  # type: ignore[misc]


INVALID = [
    ({}, ["agent: Field required", "command: Field required"]),
    ({**VALID, "agent": "Bad_Name"}, ["agent: must be lower-case"]),
    ({**VALID, "command": []}, ["command: Tuple should have at least 1 item"]),
    ({**VALID, "command": "echo hi"}, ["command: Input should be a valid"]),
    ({**VALID, "command": ["a\x00b"]}, ["command.0: must not contain NUL"]),
    ({**VALID, "timeout_s": 0}, ["timeout_s: Input should be greater than or equal to 1"]),
    ({**VALID, "timeout_s": 10**9}, ["timeout_s: Input should be less than or equal"]),
    ({**VALID, "timeout_s": "soon"}, ["timeout_s: Input should be a valid integer"]),
    ({**VALID, "limits": {"memory": "lots"}}, ["limits.memory: memory must be bytes"]),
    ({**VALID, "limits": {"memory": 1024}}, ["limits.memory: Input should be greater"]),
    ({**VALID, "limits": {"cpus": 0}}, ["limits.cpus: Input should be greater than 0"]),
    ({**VALID, "limits": {"pids": 1}}, ["limits.pids: Input should be greater"]),
    ({**VALID, "limits": {"gpus": 1}}, ["limits.gpus: Extra inputs are not permitted"]),
    ({**VALID, "env": {"1BAD": "x"}}, ["env: '1BAD' is not a valid variable name"]),
    ({**VALID, "env": {"AIRLOCK_TASK_ID": "x"}}, ["the AIRLOCK_ prefix is reserved"]),
    ({**VALID, "env": {"K": 1}}, ["env.K: Input should be a valid string"]),
    ({**VALID, "env": {f"K{i}": "v" for i in range(65)}}, ["env: Dictionary should have at most"]),
    ({**VALID, "labels": {"Upper": "x"}}, ["'Upper' is not a valid label key"]),
    ({**VALID, "image": "UPPER/case"}, ["image: must be an image reference"]),
    ({**VALID, "on_behalf_of": "a b"}, ["on_behalf_of: must be 1-128"]),
    ({**VALID, "prompt_hash": "abc"}, ["prompt_hash: must be 64 lower-case hex"]),
    ({**VALID, "queue": "../etc"}, ["queue: must be lower-case"]),
    ({**VALID, "privileged": True}, ["privileged: Extra inputs are not permitted"]),
    ({**VALID, "command": ["x" * 9000]}, ["command.0: String should have at most 8192"]),
    ([], ["spec: expected an object, got list"]),
    (
        {**VALID, "scopes": {"egress": [{"host": "Bad Host"}]}},
        ["scopes.egress.0.host: must be host"],
    ),
    (
        {**VALID, "scopes": {"egress": [{"host": "a.com", "ports": [0]}]}},
        ["scopes.egress.0.ports.0"],
    ),
    (
        {**VALID, "scopes": {"egress": [{"host": "a.com", "methods": ["get"]}]}},
        ["methods.0: must be"],
    ),
    (
        {**VALID, "scopes": {"egress": [{"host": "a.com", "paths": ["no-slash"]}]}},
        ["paths.0: must be"],
    ),
    ({**VALID, "scopes": {"tools": ["no-server"]}}, ["scopes.tools.0: must be"]),
    ({**VALID, "scopes": {"admin": True}}, ["scopes.admin: Extra inputs are not permitted"]),
]


@pytest.mark.parametrize(("data", "expected"), INVALID)
def test_invalid_specs_name_each_field(data: object, expected: list[str]) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse(data)
    text = "\n".join(caught.value.problems)
    for fragment in expected:
        assert fragment in text
    assert "Traceback" not in str(caught.value)


def test_text_formats() -> None:
    assert parse_text(json.dumps(VALID)).agent == "researcher"
    assert parse_text("agent: researcher\ncommand: [ls]\n").command == ("ls",)
    with pytest.raises(InvalidSpec, match="not valid JSON or YAML"):
        parse_text("{not json")
    with pytest.raises(InvalidSpec, match="larger than"):
        parse_text("x" * (300 * 1024))


def test_schema_describes_the_model() -> None:
    schema = json_schema()
    assert schema["title"] == "Airlock task spec"
    assert set(schema["required"]) == {"agent", "command"}
    assert schema["additionalProperties"] is False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "agent",
        "command",
        "image",
        "env",
        "timeout_s",
        "limits",
        "labels",
        "on_behalf_of",
        "model",
        "prompt_hash",
        "queue",
        "extra",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=8))
def test_any_input_is_either_a_spec_or_a_readable_refusal(data: dict[str, object]) -> None:
    try:
        spec = parse(data)
    except InvalidSpec as exc:
        assert exc.problems and all(": " in line for line in exc.problems)
    else:
        assert isinstance(spec, TaskSpec)
        assert parse(json.loads(spec.to_json())) == spec  # a valid spec survives the wire
