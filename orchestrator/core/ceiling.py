"""The registry as a ceiling on every grant, checked after the policy has spoken.

Rego computes a task's grant; this module checks that grant against the agent's registry
entry once more, in plain code, before anything is minted or started. A policy edit that
widens a grant beyond the registry (a bug, or a hostile bundle) then refuses the task
instead of running it: limits, deadline, isolation class, identity, image, egress, tools,
secrets, Vault policies and the user it acts for all stay within what the registry says.
"""

from __future__ import annotations

from orchestrator.core.agent import Agent, EgressRule
from orchestrator.core.grant import EgressGrant, Grant


def name_matches(pattern: str, name: str) -> bool:
    """An image pattern: the name exactly, or `prefix*`."""
    return pattern == name or (pattern.endswith("*") and name.startswith(pattern[:-1]))


def host_covers(pattern: str, host: str) -> bool:
    """`*.example.com` covers `api.example.com` and `*.api.example.com`, never the apex."""
    return pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:]))


def user_matches(pattern: str, user: str) -> bool:
    """A user name exactly, or `*@domain`: one address of exactly that domain."""
    if pattern == user:
        return True
    if not pattern.startswith("*@"):
        return False
    local, at, domain = user.partition("@")
    return bool(local) and bool(at) and "@" not in domain and domain.lower() == pattern[2:].lower()


def _egress_within(granted: EgressGrant, rule: EgressRule) -> bool:
    return (
        host_covers(rule.host, granted.host)
        and set(granted.ports) <= set(rule.ports)
        and set(granted.methods) <= set(rule.methods)
        and (
            not rule.paths
            or (
                bool(granted.paths)
                and all(any(p.startswith(r) for r in rule.paths) for p in granted.paths)
            )
        )
        and granted.internal <= rule.internal
        and granted.upstream_tls == rule.upstream_tls
        and (granted.scheme, granted.tls) == (rule.scheme, rule.tls)
        and granted.inject == rule.inject
        and granted.name == rule.name
        and granted.enforce >= rule.enforce  # report-only only where the registry says so
    )


def beyond(grant: Grant, agent: Agent, trust_domain: str) -> list[str]:
    """What in `grant` exceeds `agent`'s registry entry; empty when it is within."""
    return [
        *_who(grant, agent, trust_domain),
        *_how(grant, agent),
        *_reach(grant, agent),
    ]


def _who(grant: Grant, agent: Agent, trust_domain: str) -> list[str]:
    """Agent, identity and the user acted for."""
    problems = []
    name = agent.name
    if grant.agent != name:
        problems.append(f"grant is for agent {grant.agent!r}, not {name!r}")
    if grant.identity != f"spiffe://{trust_domain}/agent/{name}":
        problems.append(f"identity {grant.identity!r} is not agent {name!r}'s")
    if grant.on_behalf_of is not None and not (
        agent.delegation.allowed
        and any(user_matches(p, grant.on_behalf_of) for p in agent.delegation.users)
    ):
        problems.append(f"agent {name!r} may not act for {grant.on_behalf_of!r}")
    return problems


def _how(grant: Grant, agent: Agent) -> list[str]:
    """Image, isolation, deadline and resource limits."""
    problems = []
    if not any(name_matches(p, grant.image) for p in agent.images):
        problems.append(f"image {grant.image!r} is not among agent {agent.name!r}'s images")
    runtime = "runsc" if agent.isolation == "gvisor" else "runc"
    if grant.runtime != runtime:
        problems.append(f"runtime {grant.runtime!r}: agent {agent.name!r} needs {runtime}")
    if grant.timeout_s > agent.max_timeout_s:
        problems.append(f"timeout_s {grant.timeout_s} exceeds {agent.max_timeout_s}")
    ceiling = agent.max_limits
    for field, value, most in (
        ("cpus", grant.limits.cpus, ceiling.cpus),
        ("memory", grant.limits.memory, ceiling.memory),
        ("pids", grant.limits.pids, ceiling.pids),
    ):
        if value > most:
            problems.append(f"limits.{field} {value} exceeds {most}")
    return problems


def _reach(grant: Grant, agent: Agent) -> list[str]:
    """Egress, MCP tools, secrets and Vault policies."""
    problems = [
        f"egress to {rule.host} {list(rule.ports)} is beyond every rule"
        for rule in grant.egress
        if not any(_egress_within(rule, allowed) for allowed in agent.egress)
    ]
    tools = {
        (server.name, server.url, server.internal, rule.name): rule.args
        for server in agent.mcp
        for rule in server.tools
    }
    for tool in grant.tools:
        if tools.get((tool.server, tool.url, tool.internal, tool.tool)) != tool.args:
            problems.append(f"tool {tool.server}/{tool.tool} is beyond the registry")
    servers = {(m.name, m.url, m.internal): m for m in agent.mcp}
    for read in grant.mcp_reads:
        server = servers.get((read.server, read.url, read.internal))
        if server is None or not (
            set(read.resources) <= set(server.resources)
            and set(read.prompts) <= set(server.prompts)
        ):
            problems.append(f"MCP reads of {read.server} are beyond the registry")
    secrets = {(s.name, s.kind, s.path, s.role) for s in agent.secrets}
    for secret in grant.secrets:
        if (secret.name, secret.kind, secret.path, secret.role) not in secrets:
            problems.append(f"secret {secret.name!r} is beyond the registry")
    extra = set(grant.vault_policies) - set(agent.vault_policies)
    if extra:
        problems.append(f"vault policies {sorted(extra)} are beyond the registry")
    return problems
