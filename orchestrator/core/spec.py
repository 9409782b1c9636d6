"""The task spec: what a caller asks Airlock to run. One frozen, validated model.

Its JSON Schema (`airlock spec schema`) is the contract for upstream producers. Validation
failures become InvalidSpec with one line per offending field, never a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from orchestrator.errors import InvalidSpec

MAX_SPEC_BYTES = 256 * 1024
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MEMORY = re.compile(r"^\s*(\d+)\s*([bkmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Label namespaces of Airlock itself and of the tools that read container labels.
RESERVED_LABEL_PREFIXES = (
    "airlock.",
    "com.docker.",
    "io.docker.",
    "org.dockerproject.",
    "io.containerd.",
    "io.kubernetes.",
    "org.opencontainers.",
)
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_./-]{0,62}$")
RESERVED_ENV_PREFIX = "AIRLOCK_"


def parse_memory(value: object) -> object:
    """Accept 536870912, "512m", "512MiB", "1g"; anything else is left for pydantic to refuse."""
    if isinstance(value, str):
        match = _MEMORY.match(value)
        if not match:
            raise ValueError("memory must be bytes or a size like '512m' or '1g'")
        return int(match.group(1)) * _UNITS[match.group(2).lower()]
    return value


Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
NoNul = Annotated[str, Field(max_length=8192, pattern=r"^[^\x00]*$")]
HostPattern = Annotated[
    str,
    Field(
        max_length=253,
        pattern=r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
Method = Annotated[str, Field(pattern=r"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS|CONNECT)$")]
PathPrefix = Annotated[str, Field(max_length=1024, pattern=r"^/[^\s?#]*$")]


class Limits(BaseModel):
    """Resource ceilings enforced by the container engine; unset means the agent's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpus: float | None = Field(None, gt=0, le=64, description="CPU cores (fractions allowed)")
    memory: Annotated[int | None, BeforeValidator(parse_memory)] = Field(
        None,
        ge=16 << 20,
        le=64 << 30,
        description="memory ceiling in bytes, or a size like '512m'; no swap beyond it",
    )
    pids: int | None = Field(None, ge=8, le=32768, description="maximum number of processes")


class EgressRequest(BaseModel):
    """Outbound access a task asks for; unset fields mean 'whatever the agent allows'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: HostPattern
    ports: tuple[Port, ...] | None = Field(None, min_length=1)
    methods: tuple[Method, ...] | None = Field(None, min_length=1)
    paths: tuple[PathPrefix, ...] | None = Field(None, min_length=1)


class Scopes(BaseModel):
    """What a task asks for, to narrow it below its agent's ceiling. Unset: the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    egress: tuple[EgressRequest, ...] | None = Field(None, max_length=64)
    tools: (
        tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}/[A-Za-z0-9_.:-]{1,128}$")], ...]
        | None
    ) = Field(None, max_length=128, description="MCP tools as server/tool")
    secrets: tuple[Name, ...] | None = Field(None, max_length=32)


class TaskSpec(BaseModel):
    """One agent task: which agent runs what, with which limits, for how long."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Airlock task spec")

    agent: Name = Field(description="agent role the task runs as")
    command: tuple[NoNul, ...] = Field(
        min_length=1, max_length=256, description="argv of the task command (no shell)"
    )
    image: str | None = Field(
        None,
        max_length=255,
        pattern=r"^[a-z0-9][a-z0-9._/:@-]*$",
        description="runner image; defaults to the deployment's runner image",
    )
    env: dict[str, NoNul] = Field(
        default_factory=dict, max_length=64, description="non-secret environment variables"
    )
    timeout_s: int | None = Field(
        None, ge=1, le=86400, description="deadline in seconds; unset: the agent's default"
    )
    limits: Limits = Field(default=Limits())
    scopes: Scopes = Field(default=Scopes())
    labels: dict[str, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=32, description="free-form labels for the caller"
    )
    on_behalf_of: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._@+-]{1,128}$", description="user the agent acts for"
    )
    model: str | None = Field(
        None, max_length=128, pattern=r"^[^\x00-\x1f]*$", description="model driving the agent"
    )
    prompt_hash: str | None = Field(
        None, pattern=r"^(sha256:)?[0-9a-f]{64}$", description="hash of the prompt, for audit"
    )
    queue: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="worker pool to run on"
    )

    @field_validator("env")
    @classmethod
    def _env_keys(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid variable name")
            if key.upper().startswith(RESERVED_ENV_PREFIX):
                raise ValueError(f"{key!r}: the {RESERVED_ENV_PREFIX} prefix is reserved")
        return env

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid label key")
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"{key!r}: label keys under {key.split('.')[0]}. are reserved")
        return labels

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


# What a pattern means, for the fields whose regular expression would read as noise.
_PATTERN_HINTS = {
    "agent": "must be lower-case letters, digits and '-', starting with a letter (max 63)",
    "image": "must be an image reference like 'name:tag' or 'registry/name@sha256:...'",
    "on_behalf_of": "must be 1-128 letters, digits or . _ @ + -",
    "model": "must not contain control characters",
    "prompt_hash": "must be 64 lower-case hex digits, optionally prefixed 'sha256:'",
    "queue": "must be lower-case letters, digits, '.', '_' or '-' (max 63)",
    "command": "must not contain NUL bytes",
    "env": "must not contain NUL bytes",
    "scopes": "must be host names (or *.suffix), /path prefixes, methods in capitals, "
    "server/tool names or secret names",
}


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "spec"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":
            message = _PATTERN_HINTS.get(str(err["loc"][0]), message)
        lines.append(f"{where}: {message}")
    return lines


def parse(data: object) -> TaskSpec:
    """Validate a mapping into a TaskSpec. Raises InvalidSpec with one line per problem."""
    if isinstance(data, TaskSpec):
        return data
    if not isinstance(data, Mapping):
        raise InvalidSpec([f"spec: expected an object, got {type(data).__name__}"])
    try:
        return TaskSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidSpec(_problems(exc)) from None


def parse_text(text: str, source: str = "spec") -> TaskSpec:
    """Parse JSON or YAML text (JSON is YAML, but gets the clearer JSON errors)."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise InvalidSpec([f"{source}: larger than {MAX_SPEC_BYTES} bytes"])
    data: Any
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidSpec([f"{source}: not valid JSON or YAML ({exc})"]) from None
    return parse(data)


def load_file(path: Path) -> TaskSpec:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec([f"{path}: cannot read ({exc})"]) from None
    return parse_text(text, str(path))


def json_schema() -> dict[str, Any]:
    return TaskSpec.model_json_schema()


def record_fields(spec: TaskSpec) -> dict[str, Any]:
    """The fields a new task record starts with."""
    return {
        "agent": spec.agent,
        "spec": spec.to_json(),
        "queue": spec.queue,
        "on_behalf_of": spec.on_behalf_of,
        "timeout_s": spec.timeout_s,
    }
