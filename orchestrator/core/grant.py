"""The grant: what one task may do, computed once at admission and never widened after.

`Grant` is the immutable record (stored with the task, hashed). `CompiledGrant` is the same
grant shaped for per-request checks on the hot path (gateway, secrets): dictionary and
suffix lookups, no Rego.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from orchestrator.core.agent import ArgConstraint, Injection


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EgressGrant(_Frozen):
    host: str
    ports: tuple[int, ...]
    methods: tuple[str, ...]
    paths: tuple[str, ...] = ()
    internal: bool = False
    upstream_tls: bool = False
    inject: Injection | None = None
    name: str | None = None
    enforce: bool = True
    scheme: Literal["https", "http"] = "https"
    tls: Literal["intercept", "passthrough"] = "intercept"


class ToolGrant(_Frozen):
    server: str
    url: str
    tool: str
    args: dict[str, ArgConstraint] = {}
    internal: bool = False


class McpReadGrant(_Frozen):
    """What a task may read from one MCP server besides its tools."""

    server: str
    url: str
    resources: tuple[str, ...] = ()  # URI prefixes for resources/read
    prompts: tuple[str, ...] = ()  # names for prompts/get
    internal: bool = False


class SecretGrant(_Frozen):
    name: str
    kind: str
    path: str | None = None
    role: str | None = None


class GrantLimits(_Frozen):
    cpus: float
    memory: int
    pids: int


class Grant(_Frozen):
    agent: str
    identity: str
    on_behalf_of: str | None
    image: str
    runtime: str
    timeout_s: int
    limits: GrantLimits
    egress: tuple[EgressGrant, ...]
    tools: tuple[ToolGrant, ...]
    secrets: tuple[SecretGrant, ...]
    vault_policies: tuple[str, ...]
    mcp_reads: tuple[McpReadGrant, ...] = ()

    @classmethod
    def build(cls, agent: str, **fields: Any) -> Grant:
        """A grant of `agent` with just `fields` set, and nothing else allowed: no egress,
        tools or secrets unless given (an unclaimed warm runner's; tests; benchmarks)."""
        return cls.model_validate(
            {
                "agent": agent,
                "identity": f"spiffe://airlock.local/agent/{agent}",
                "on_behalf_of": None,
                "image": "",
                "runtime": "runc",
                "timeout_s": 1,
                "limits": {"cpus": 1, "memory": 1 << 24, "pids": 1},
                "egress": [],
                "tools": [],
                "secrets": [],
                "vault_policies": [],
                **fields,
            }
        )

    def injections(self) -> list[Injection]:
        """Every distinct credential the gateway must hold for this task."""
        seen: dict[str, Injection] = {}
        for rule in self.egress:
            if rule.inject and rule.inject.name not in seen:
                seen[rule.inject.name] = rule.inject
        return list(seen.values())

    def reads_vault(self) -> bool:
        """Whether provisioning reads anything from Vault with a task token."""
        return bool(self.secrets) or any(inj.path for inj in self.injections())

    # A grant is frozen: its JSON and digest are worked out once (a task asks several times).
    @cached_property
    def canonical(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @cached_property
    def hashed(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical.encode()).hexdigest()

    def canonical_json(self) -> str:
        return self.canonical

    def digest(self) -> str:
        return self.hashed


@dataclass(frozen=True)
class Check:
    """The answer to one request: allowed or not, by which rule, and why."""

    allowed: bool
    rule: str
    reason: str
    internal: bool = False  # the matching rule may reach internal addresses
    tls: bool = False  # the gateway speaks TLS to the upstream
    inject: Injection | None = None  # a credential the gateway adds for this upstream
    passthrough: bool = False  # a tunnel left opaque (else the gateway intercepts it)


DENY_NO_RULE = Check(False, "default-deny", "no egress rule of the grant matches this host")


class CompiledGrant:
    """A grant indexed for checks that cost microseconds."""

    def __init__(self, grant: Grant) -> None:
        self.grant = grant
        self._exact: dict[str, list[tuple[str, EgressGrant, frozenset[int], frozenset[str]]]] = {}
        self._suffix: list[tuple[str, str, EgressGrant, frozenset[int], frozenset[str]]] = []
        for index, rule in enumerate(grant.egress):
            name = rule.name or f"egress[{index}] {rule.host}"
            ports, methods = frozenset(rule.ports), frozenset(rule.methods)
            if rule.host.startswith("*."):
                self._suffix.append((rule.host[1:], name, rule, ports, methods))
            else:
                self._exact.setdefault(rule.host, []).append((name, rule, ports, methods))
        self._tools = {(t.server, t.tool): t for t in grant.tools}
        self._reads = {r.server: r for r in grant.mcp_reads}
        # Granted MCP servers by (scheme, host, port): (path, server, internal) each.
        self._servers: dict[tuple[str, str, int], list[tuple[str, str, bool]]] = {}
        servers = [(t.server, t.url, t.internal) for t in grant.tools]
        servers += [(r.server, r.url, r.internal) for r in grant.mcp_reads]
        for server, address, internal in servers:
            url = urlsplit(address)
            if url.scheme in ("http", "https") and url.hostname:
                port = url.port or (443 if url.scheme == "https" else 80)
                where = (url.scheme, url.hostname.lower(), port)
                entry = (url.path or "/", server, internal)
                if entry not in self._servers.setdefault(where, []):
                    self._servers[where].append(entry)

    def tls_ports(self) -> list[int]:
        """The ports the task reaches over TLS: its runner serves them on loopback for clients
        that ignore proxy settings (each connection still a CONNECT the gateway decides)."""
        https = {p for rule in self.grant.egress if rule.scheme == "https" for p in rule.ports}
        https |= {port for (scheme, _, port) in self._servers if scheme == "https"}
        return sorted(https)

    def tools_of(self, server: str) -> frozenset[str]:
        """The tools of one MCP server this task may call (and see listed)."""
        return frozenset(tool for (name, tool) in self._tools if name == server)

    def mcp_server_for(
        self, host: str, port: int, path: str, scheme: str = "https"
    ) -> tuple[str, bool] | None:
        """(server name, internal) when the request goes to a granted MCP server's URL."""
        for prefix, server, internal in self._servers.get((scheme, host, port), ()):
            if (
                path == prefix
                or path.startswith(prefix.rstrip("/") + "/")
                or path.startswith(prefix + "?")
            ):
                return server, internal
        return None

    def _candidates(
        self, host: str
    ) -> list[tuple[str, EgressGrant, frozenset[int], frozenset[str]]]:
        found = list(self._exact.get(host, ()))
        for suffix, name, rule, ports, methods in self._suffix:
            if host.endswith(suffix):
                found.append((name, rule, ports, methods))
        return found

    def check_tunnel(self, host: str, port: int) -> Check:
        """May this task open a CONNECT tunnel to host:port, and is it left opaque?

        Only https rules open tunnels. A passthrough rule gives an opaque one (the gateway
        checks its TLS server name only); any other https rule, or a granted https MCP
        server, gives one the gateway intercepts, deciding each request inside it.
        """
        found = self._candidates(host)
        https = [c for c in found if c[1].scheme == "https"]
        for name, rule, ports, _ in https:
            if port in ports and rule.tls == "passthrough":
                return Check(True, name, "granted (passthrough)", rule.internal, passthrough=True)
        for name, rule, ports, _ in https:
            if port in ports:
                return Check(True, name, "granted; each request inside is decided", rule.internal)
        servers = self._servers.get(("https", host, port))
        if servers:
            _, server, internal = servers[0]
            return Check(True, f"mcp {server}", "granted MCP server", internal)
        if https:
            name, rule = https[0][:2]
            return Check(False, name, f"port {port} is not granted for {rule.host}")
        if found:
            name, rule = found[0][:2]
            return Check(False, name, f"{rule.host} is granted over plain http only: no tunnel")
        return DENY_NO_RULE

    def check_egress(
        self, host: str, port: int, method: str, path: str, scheme: str = "https"
    ) -> Check:
        """May this task send `method` to scheme://host:port with this path? (https
        requests are those the gateway reads inside an intercepted tunnel.)

        `host` must already be normalised (lower case, no trailing dot).
        """
        found = self._candidates(host)
        candidates = [c for c in found if c[1].scheme == scheme]
        if not candidates:
            if found:
                name, rule = found[0][:2]
                return Check(False, name, f"{rule.host} is granted over {rule.scheme} only")
            return DENY_NO_RULE
        # Of several rules for the host, the refusal names the one that came closest.
        refusal, closeness, rule_of = DENY_NO_RULE, -1, None
        for name, rule, ports, methods in candidates:
            tls = rule.upstream_tls or scheme == "https"
            if port not in ports:
                near = 0, Check(False, name, f"port {port} is not granted for {rule.host}")
            elif method not in methods:
                near = 1, Check(False, name, f"method {method} is not granted for {rule.host}")
            elif rule.paths and not path.startswith(rule.paths):
                near = 2, Check(False, name, f"path is outside {', '.join(rule.paths)}")
            else:
                return Check(True, name, "granted", rule.internal, tls, rule.inject)
            if near[0] > closeness:
                closeness, (refusal, rule_of) = near[0], (near[1], rule)
        if rule_of is not None and not rule_of.enforce:  # a rule being rolled out: report only
            reason = f"report-only: would deny: {refusal.reason}"
            tls = rule_of.upstream_tls or scheme == "https"
            return Check(True, refusal.rule, reason, rule_of.internal, tls)
        return refusal

    def check_read(self, server: str, method: str, what: Any) -> Check:
        """May this task read resource URI `what` (resources/read) or get prompt `what`
        (prompts/get) from MCP `server`?"""
        problem = _read_problem(self._reads.get(server), method, what)
        if problem:
            return Check(False, "default-deny", problem)
        return Check(True, f"mcp {server} {method}", "granted")

    def check_tool(self, server: str, tool: str, args: dict[str, Any]) -> Check:
        """May this task call MCP `tool` on `server` with these arguments?"""
        granted = self._tools.get((server, tool))
        name = f"tool {server}/{tool}"
        if granted is None:
            return Check(False, "default-deny", f"tool {server}/{tool} is not granted")
        for arg, constraint in granted.args.items():
            problem = _arg_problem(constraint, args.get(arg))
            if problem:
                return Check(False, name, f"argument {arg!r} {problem}")
        return Check(True, name, "granted")


def _read_problem(granted: McpReadGrant | None, method: str, what: Any) -> str | None:
    """Why resources/read of URI `what`, or prompts/get of name `what`, is not granted."""
    if not isinstance(what, str):
        return f"{method} needs a {'uri' if method == 'resources/read' else 'name'}"
    if method == "resources/read":
        prefixes = granted.resources if granted else ()
        if not any(what.startswith(p) for p in prefixes) or _climbs(what):
            return f"resource {what[:128]!r} is not granted"
        return None
    if what not in (granted.prompts if granted else ()):
        return f"prompt {what[:128]!r} is not granted"
    return None


def _arg_problem(constraint: ArgConstraint, value: Any) -> str | None:
    if constraint.one_of is not None and value not in constraint.one_of:
        return "is not one of the allowed values"
    if constraint.prefix is not None:
        if not isinstance(value, str) or not value.startswith(constraint.prefix):
            return f"must start with {constraint.prefix!r}"
        if _climbs(value):
            return (
                "is not a plain path (dot segments, escapes or backslashes could leave the prefix)"
            )
    if constraint.max_length is not None and _length(value) > constraint.max_length:
        return f"is longer than {constraint.max_length}"
    return None


def _climbs(value: str) -> bool:
    """Whether a prefixed value could mean something outside its prefix to whoever reads it
    as a path or URL: `.` or `..` segments, escaped dots or separators, backslashes, NUL."""
    lowered = value.lower()
    if "\\" in value or "\0" in value or any(e in lowered for e in ("%2e", "%2f", "%5c", "%00")):
        return True
    return any(segment in (".", "..") for segment in value.split("/"))


def _length(value: Any) -> int:
    """How long a value is, for max_length: characters of a string, items of an array,
    characters of the JSON of anything else (an object, a number)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return len(json.dumps(value, separators=(",", ":"), default=str))
