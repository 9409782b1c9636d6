"""An agent role as a value: what it may ever be given (images, limits, isolation class, Vault
policies and secrets, egress, MCP tools, delegation). Items marked `default: false` are
granted only when a task asks for them by name. `policy.agents` loads these from YAML.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from orchestrator.core.spec import HostPattern, Method, Name, PathPrefix, Port, parse_memory


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Injection(_Frozen):
    """A credential the gateway adds for one upstream; the task only ever sees a placeholder.

    Either a secret read from Vault KV (`path`, `field`), or the task's own identity as a
    JWT minted for this upstream alone (`audience`): same subject and actor chain as the task
    JWT, `aud` the upstream's, expiring with the task. The gateway's own token is never sent
    upstream, and no two upstreams accept the same token.
    """

    name: Name = Field(description="the placeholder's name, AIRLOCK_CREDENTIAL_<NAME> in the task")
    path: str | None = Field(None, min_length=1, description="Vault KV path holding the credential")
    field: str = Field("token", min_length=1)
    audience: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,199}$",
        description="instead of a secret: a task JWT whose aud is this upstream's",
    )
    header: Annotated[str, Field(pattern=r"^[a-z0-9-]{1,64}$")] = "authorization"
    template: Annotated[str, Field(pattern=r"\{value\}")] = "Bearer {value}"

    @model_validator(mode="after")
    def _one_source(self) -> Injection:
        if (self.path is None) == (self.audience is None):
            raise ValueError("an injection names either a Vault path or an audience")
        return self


class EgressRule(_Frozen):
    host: HostPattern = Field(description="exact host name, or *.suffix for its subdomains")
    ports: tuple[Port, ...] = Field((443,), min_length=1)
    methods: tuple[Method, ...] = Field(("GET", "HEAD"), min_length=1)
    paths: tuple[PathPrefix, ...] = Field((), description="path prefixes (plain HTTP); none = any")
    internal: bool = Field(
        False, description="may reach internal addresses (loopback, private ranges, metadata)"
    )
    upstream_tls: bool = Field(
        False, description="the task sends plain http://; the gateway speaks TLS upstream"
    )
    inject: Injection | None = None
    default: bool = True


class ArgConstraint(_Frozen):
    prefix: str | None = None
    one_of: tuple[str | int | float | bool, ...] | None = None
    max_length: int | None = Field(None, ge=0)


class ToolRule(_Frozen):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    args: dict[str, ArgConstraint] = Field(default_factory=dict)
    default: bool = True


class McpServer(_Frozen):
    name: Name
    url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")]
    tools: tuple[ToolRule, ...] = ()
    internal: bool = Field(False, description="the server is on an internal address")


class SecretRule(_Frozen):
    name: Name
    kind: Literal["kv", "database"]
    path: str | None = Field(None, description="KV path, for kind kv")
    role: str | None = Field(None, description="database role, for kind database")
    default: bool = True


# A user name exactly, or every address of one domain ("*@example.com"); nothing else.
UserPattern = Annotated[
    str, Field(pattern=r"^(\*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|[A-Za-z0-9._+-]+(@[A-Za-z0-9.-]+)?)$")
]


class Delegation(_Frozen):
    allowed: bool = False
    users: tuple[UserPattern, ...] = Field(
        (), description="user names exactly, or *@domain for every address of that domain"
    )


class MaxLimits(_Frozen):
    cpus: float = Field(gt=0, le=64)
    memory: Annotated[int, BeforeValidator(parse_memory)] = Field(ge=16 << 20)
    pids: int = Field(ge=8, le=32768)


class Agent(_Frozen):
    name: Name
    owner: str = Field(min_length=1, max_length=256)
    description: str = Field("", max_length=2000)
    images: tuple[str, ...] = Field(min_length=1, description="allowed images; 'prefix*' allowed")
    max_limits: MaxLimits
    max_timeout_s: int = Field(ge=1, le=86400)
    isolation: Literal["runc", "gvisor"] = "runc"
    vault_policies: tuple[Name, ...] = ()
    secrets: tuple[SecretRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    mcp: tuple[McpServer, ...] = ()
    delegation: Delegation = Delegation()

    def policy_input(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
