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


# Values that become Vault policy text and API paths: plain segments only. No quotes or
# newlines (they would end the policy's path string), no `*` or `+` (Vault policy globs),
# no `..`, no leading or doubled slash.
VaultPath = Annotated[
    str,
    Field(
        max_length=256,
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-][A-Za-z0-9_.=-]*)*$",
        description="a Vault path: segments of letters, digits, _ - . and =, no globs",
    ),
]
VaultRole = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# Hosts no registry rule may name: the metadata services hand out the host's own cloud
# credentials (the gateway also refuses any name that resolves to one).
METADATA_HOSTS = frozenset(
    {
        "169.254.169.254",
        "169.254.170.2",
        "100.100.100.200",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
    }
)


class Injection(_Frozen):
    """A credential the gateway adds for one upstream; the task only ever sees a placeholder.

    Either a secret read from Vault KV (`path`, `field`), or the task's own identity as a
    JWT minted for this upstream alone (`audience`): same subject and actor chain as the task
    JWT, `aud` the upstream's, expiring with the task. The gateway's own token is never sent
    upstream, and no two upstreams accept the same token.
    """

    name: Name = Field(description="the placeholder's name, AIRLOCK_CREDENTIAL_<NAME> in the task")
    path: VaultPath | None = Field(None, description="Vault KV path holding the credential")
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
    name: Name | None = Field(
        None,
        description="what answers, audit lines and spans call the rule (default: egress[N] HOST)",
    )
    host: HostPattern = Field(description="exact host name, or *.suffix for its subdomains")
    ports: tuple[Port, ...] = Field((443,), min_length=1)
    methods: tuple[Method, ...] = Field(("GET", "HEAD"), min_length=1)
    paths: tuple[PathPrefix, ...] = Field((), description="path prefixes; none = any")
    internal: bool = Field(
        False, description="may reach internal addresses (loopback, private ranges, metadata)"
    )
    scheme: Literal["https", "http"] = Field(
        "https",
        description=(
            "how the task reaches the upstream: https (CONNECT through the gateway) or plain "
            "http (absolute http:// URLs); a plain-HTTP rule opens no tunnel"
        ),
    )
    tls: Literal["intercept", "passthrough"] = Field(
        "intercept",
        description=(
            "https only. intercept: the gateway ends the task's TLS with a leaf of its own "
            "CA and decides every request inside; passthrough: an opaque tunnel whose TLS "
            "server name must be the CONNECT host (a rule without methods, paths or inject)"
        ),
    )
    upstream_tls: bool = Field(
        False,
        description="scheme http: the task sends plain http://; the gateway speaks TLS upstream",
    )
    inject: Injection | None = None
    enforce: bool = Field(
        True,
        description=(
            "false: report only; what this rule would deny for its host is let through and "
            "audited as 'report-only: would deny', to roll a new rule out safely"
        ),
    )
    default: bool = True

    @model_validator(mode="before")
    @classmethod
    def _upstream_tls_is_plain_http(cls, data: Any) -> Any:
        """`upstream_tls: true` has always meant a task speaking plain http:// to the gateway."""
        if isinstance(data, dict) and data.get("upstream_tls") and "scheme" not in data:
            return {**data, "scheme": "http"}
        return data

    @model_validator(mode="after")
    def _guard_rails(self) -> EgressRule:
        if self.upstream_tls and self.scheme != "http":
            raise ValueError(f"{self.host}: upstream_tls is for scheme http (https is TLS already)")
        if self.tls == "passthrough":
            if self.scheme != "https":
                raise ValueError(f"{self.host}: tls: passthrough is for scheme https")
            seen = {"methods", "paths", "inject"} & self.model_fields_set
            if seen:
                raise ValueError(
                    f"{self.host}: a passthrough tunnel is opaque, so its rule cannot name "
                    f"{', '.join(sorted(seen))}; drop them, or let the gateway intercept"
                )
        if self.host in METADATA_HOSTS:
            raise ValueError(f"{self.host}: a cloud metadata service is never an egress target")
        if self.host.startswith("*.") and self.internal:
            raise ValueError(f"{self.host}: internal: true needs an exact host, not a wildcard")
        if self.host.startswith("*.") and self.inject is not None:
            raise ValueError(f"{self.host}: a credential is injected for an exact host only")
        return self


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
    resources: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*:\S*$")], ...] = Field(
        (), description="URI prefixes resources/read may ask for (none: no resource)"
    )
    prompts: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")], ...] = Field(
        (), description="prompt names prompts/get may ask for (none: no prompt)"
    )
    internal: bool = Field(False, description="the server is on an internal address")


class SecretRule(_Frozen):
    name: Name
    kind: Literal["kv", "database"]
    path: VaultPath | None = Field(None, description="KV path, for kind kv")
    role: VaultRole | None = Field(None, description="database role, for kind database")
    deliver: Literal["task"] | None = Field(
        None,
        description=(
            "kind kv only: `task` hands the static value to the task itself, where it stays "
            "valid after the task ends (prefer `inject` on an egress rule)"
        ),
    )
    default: bool = True

    @model_validator(mode="after")
    def _source(self) -> SecretRule:
        if self.kind == "kv" and (self.path is None or self.role is not None):
            raise ValueError(f"secret {self.name}: kind kv names a path (and no role)")
        if self.kind == "kv" and self.deliver != "task":
            raise ValueError(
                f"secret {self.name}: a static kv value outlives the task; inject it at the "
                "gateway (an egress rule's inject), or say deliver: task to hand it over"
            )
        if self.kind == "database" and (self.role is None or self.path is not None):
            raise ValueError(f"secret {self.name}: kind database names a role (and no path)")
        return self


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

    @model_validator(mode="after")
    def _rule_names_are_unique(self) -> Agent:
        named = [rule.name for rule in self.egress if rule.name]
        if len(named) != len(set(named)):
            raise ValueError("egress rule names must be unique within an agent")
        return self

    def policy_input(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
