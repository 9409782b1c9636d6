"""`airlock vault setup`: make Vault match the agent registry. Idempotent.

Per agent role: a policy naming exactly the secrets it may request, a token role that
mints orphan, periodic tokens with an explicit max TTL, bound to the agent's own entity
alias (one identity per role in Vault too), and a ticket role: only a login with the front
door's admission ticket for that agent may use the token role. Shared: a transit key that
signs task JWTs, and the database secrets engine against PostgreSQL with one role per
database secret, whose revocation really drops the PostgreSQL role. Anything `airlock-*`
that no agent needs any more is removed with `--prune` (leave it off where several
registries share one Vault).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.adapters.gateway.interception import GATEWAY_CA, LEAF_ROLE, LEAF_TTL_S
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.core.agent import Agent
from orchestrator.errors import ConfigError

PREFIX = "airlock-"
JWT_KEY = "airlock-task-jwt"
AUDIT_KEY = "airlock-audit"  # signs audit chain heads (anchors) and retention marks
DB_CONNECTION = "airlock-postgres"

CREATION = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
    'GRANT CONNECT ON DATABASE "{db}" TO "{{name}}";',
    'GRANT USAGE ON SCHEMA public TO "{{name}}";',
    'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";',
]
REVOCATION = [
    'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{{name}}";',
    'REVOKE USAGE ON SCHEMA public FROM "{{name}}";',
    'REVOKE CONNECT ON DATABASE "{db}" FROM "{{name}}";',
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'DROP ROLE IF EXISTS "{{name}}";',
]


# Admission tickets as Vault logins: a JWT auth method trusting the front door's ticket key,
# with one role per agent bound to the ticket's `agent` claim. Logging in with a task's
# ticket gives a token of minutes whose one right is minting that agent's task token and
# signing task JWTs; nothing else in Airlock holds either right.
TICKET_AUTH = "airlock-tickets"
TICKET_ISSUER = "airlock-front-door"  # as adapters.ticket signs it
MINT_TOKEN_TTL = "5m"


# Everything the orchestrator's own token needs at run time, and nothing more. `vault setup`
# (which needs an administrator's token) writes it; workers then run with a token of it.
ORCHESTRATOR_POLICY = "airlock-orchestrator"
ORCHESTRATOR_RULES = f"""# Managed by airlock vault setup: the capabilities of an Airlock worker.
# It mints no task token and signs no task JWT with its own token: for each task it logs in
# with the front door's admission ticket (auth/{TICKET_AUTH}), as that task's agent only.
path "auth/token/lookup-accessor" {{ capabilities = ["update"] }}
path "auth/token/revoke-accessor" {{ capabilities = ["update"] }}
path "sys/leases/lookup" {{ capabilities = ["update"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "sys/wrapping/lookup" {{ capabilities = ["update"] }}
path "transit/keys/{JWT_KEY}" {{ capabilities = ["read"] }}
path "transit/sign/{AUDIT_KEY}" {{ capabilities = ["update"] }}
path "transit/verify/{AUDIT_KEY}" {{ capabilities = ["update"] }}
path "sys/health" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "{GATEWAY_CA}/issue/{LEAF_ROLE}" {{ capabilities = ["update"] }}
"""


def mint_policy(agent: str) -> str:
    return f"{PREFIX}mint-{agent}"


def mint_rules(agent: str) -> str:
    return f"""# Managed by airlock vault setup: what a ticket for agent {agent} may mint.
path "auth/token/create/{token_role(agent)}" {{ capabilities = ["update"] }}
path "transit/keys/{JWT_KEY}" {{ capabilities = ["read"] }}
path "transit/sign/{JWT_KEY}" {{ capabilities = ["update"] }}
path "auth/token/revoke-self" {{ capabilities = ["update"] }}
"""


# The gateway CA: a PKI engine whose root key is generated inside Vault and never leaves it.
# The gateway asks it for an hour's leaf per host it intercepts TLS for; only tasks trust it.
CA_LIFETIME = "87600h"

# Airlock's own parts log in with AppRole (production may use JWT or Kubernetes auth the
# same way), each with its own narrow policy. The worker's is the orchestrator policy above.
COMPONENT_AUTH = "airlock-components"
GATEWAY_RULES = f"""# Managed by airlock vault setup: the capabilities of `airlock gateway`.
path "transit/keys/{JWT_KEY}" {{ capabilities = ["read"] }}
path "sys/wrapping/lookup" {{ capabilities = ["update"] }}
path "transit/sign/{AUDIT_KEY}" {{ capabilities = ["update"] }}
path "transit/verify/{AUDIT_KEY}" {{ capabilities = ["update"] }}
path "sys/health" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "{GATEWAY_CA}/issue/{LEAF_ROLE}" {{ capabilities = ["update"] }}
"""
API_RULES = f"""# Managed by airlock vault setup: the capabilities of `airlock serve`.
path "transit/keys/{JWT_KEY}" {{ capabilities = ["read"] }}
path "transit/verify/{AUDIT_KEY}" {{ capabilities = ["update"] }}
path "sys/health" {{ capabilities = ["read"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
"""
COMPONENT_POLICIES = {
    "worker": (ORCHESTRATOR_POLICY, ORCHESTRATOR_RULES),
    "gateway": (f"{PREFIX}gateway", GATEWAY_RULES),
    "api": (f"{PREFIX}api", API_RULES),
}
COMPONENT_TOKEN_TTL = "1h"


def token_role(agent: str) -> str:
    return f"{PREFIX}{agent}"


def agent_policy(agent: str) -> str:
    return f"{PREFIX}agent-{agent}"


def entity_alias(agent: str) -> str:
    return f"{PREFIX}agent-{agent}"


def policy_document(agent: Agent) -> str:
    """HCL granting read on exactly the agent's secrets, and nothing else."""
    paths = [f"database/creds/{s.role}" for s in agent.secrets if s.kind == "database" and s.role]
    paths += [s.path for s in agent.secrets if s.kind == "kv" and s.path]
    paths += [rule.inject.path for rule in agent.egress if rule.inject and rule.inject.path]
    rules = [f'path "{p}" {{\n  capabilities = ["read"]\n}}' for p in sorted(set(paths))]
    return f"# Managed by airlock vault setup for agent {agent.name}.\n" + "\n".join(rules) + "\n"


@dataclass
class Report:
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def note(self, what: str, changed: bool) -> None:
        (self.changed if changed else self.unchanged).append(what)


def _put(
    vault: Vault, report: Report, what: str, path: str, body: dict[str, object], same: bool
) -> None:
    if not same:
        vault.write(path, body)
    report.note(what, not same)


def ensure_policy(vault: Vault, report: Report, name: str, document: str) -> None:
    current = vault.read(f"sys/policies/acl/{name}", missing_ok=True)
    same = current is not None and current.get("data", {}).get("policy") == document
    _put(vault, report, f"policy {name}", f"sys/policies/acl/{name}", {"policy": document}, same)


def ensure_mount(
    vault: Vault, report: Report, path: str, kind: str, config: dict[str, str] | None = None
) -> None:
    mounts = (vault.read("sys/mounts") or {}).get("data", {})
    present = f"{path}/" in mounts
    if not present:
        vault.write(f"sys/mounts/{path}", {"type": kind, **({"config": config} if config else {})})
    report.note(f"secrets engine {kind} at {path}/", not present)


def ensure_gateway_ca(vault: Vault, report: Report) -> None:
    """The gateway CA (made once: its key is Vault's alone) and the role its leaves come
    from: any host or address a task may be granted, EC P-256, an hour at most each,
    server use only, not stored (a leaf is the gateway's, in memory, for its hour)."""
    ensure_mount(vault, report, GATEWAY_CA, "pki", {"max_lease_ttl": CA_LIFETIME})
    present = bool(vault.list(f"{GATEWAY_CA}/issuers"))
    if not present:
        vault.write(
            f"{GATEWAY_CA}/root/generate/internal",
            {
                "common_name": "Airlock gateway CA",
                "key_type": "ec",
                "key_bits": 256,
                "ttl": CA_LIFETIME,
            },
        )
    report.note("gateway CA (key held by Vault)", not present)
    role = {
        "allow_any_name": True,
        "enforce_hostnames": False,
        "allow_ip_sans": True,
        "allow_wildcard_certificates": False,
        "key_type": "ec",
        "key_bits": 256,
        "ttl": f"{LEAF_TTL_S}s",
        "max_ttl": f"{LEAF_TTL_S}s",
        "no_store": True,
        "server_flag": True,
        "client_flag": False,
        "require_cn": True,
    }
    path = f"{GATEWAY_CA}/roles/{LEAF_ROLE}"
    current = (vault.read(path, missing_ok=True) or {}).get("data") or {}
    same = current.get("no_store") is True and current.get("max_ttl") == LEAF_TTL_S
    _put(vault, report, f"pki role {LEAF_ROLE}", path, role, same)


def ensure_jwt_key(vault: Vault, report: Report) -> None:
    for name, kind in ((JWT_KEY, "ecdsa-p256"), (AUDIT_KEY, "ed25519")):
        present = vault.read(f"transit/keys/{name}", missing_ok=True) is not None
        if not present:
            vault.write(f"transit/keys/{name}", {"type": kind})
        report.note(f"transit key {name}", not present)


def ensure_agent(vault: Vault, report: Report, agent: Agent, grace_s: int, period_s: int) -> None:
    name = agent_policy(agent.name)
    ensure_policy(vault, report, name, policy_document(agent))
    role = {
        "allowed_policies": sorted({name, *agent.vault_policies}),
        "orphan": True,
        "renewable": True,
        "token_type": "service",
        "token_period": period_s,
        "token_explicit_max_ttl": agent.max_timeout_s + grace_s,
        "allowed_entity_aliases": [entity_alias(agent.name)],
    }
    current = vault.read(f"auth/token/roles/{token_role(agent.name)}", missing_ok=True)
    data = (current or {}).get("data", {})
    same = current is not None and all(
        sorted(data.get(k) or []) == v if isinstance(v, list) else data.get(k) == v
        for k, v in role.items()
    )
    _put(
        vault,
        report,
        f"token role {token_role(agent.name)}",
        f"auth/token/roles/{token_role(agent.name)}",
        role,
        same,
    )


def ensure_database(
    vault: Vault, report: Report, agents: Iterable[Agent], postgres_url: str, grace_s: int
) -> None:
    url = urlsplit(postgres_url)
    db = url.path.lstrip("/") or "postgres"
    roles = {
        s.role: agent for agent in agents for s in agent.secrets if s.kind == "database" and s.role
    }
    ensure_mount(vault, report, "database", "database")
    # Other registries may share this Vault: keep the roles they allowed.
    current = vault.read(f"database/config/{DB_CONNECTION}", missing_ok=True) or {}
    allowed = set(current.get("data", {}).get("allowed_roles") or []) | set(roles)
    templated = (
        f"postgresql://{{{{username}}}}:{{{{password}}}}@{url.hostname}:{url.port or 5432}/{db}"
    )
    vault.write(
        f"database/config/{DB_CONNECTION}",
        {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": templated + "?sslmode=disable",
            "username": url.username,
            "password": url.password,
            "allowed_roles": sorted(allowed),
            "verify_connection": True,
        },
    )
    report.note(f"database connection {DB_CONNECTION}", True)
    for role, agent in sorted(roles.items()):
        ttl = agent.max_timeout_s + grace_s
        vault.write(
            f"database/roles/{role}",
            {
                "db_name": DB_CONNECTION,
                "creation_statements": [s.replace("{db}", db) for s in CREATION],
                "revocation_statements": [s.replace("{db}", db) for s in REVOCATION],
                "default_ttl": ttl,
                "max_ttl": ttl,
            },
        )
        report.note(f"database role {role}", True)


def remove_stale(vault: Vault, report: Report, agents: dict[str, Agent]) -> None:
    wanted_roles = {token_role(a) for a in agents}
    for role in vault.list("auth/token/roles"):
        if role.startswith(PREFIX) and role not in wanted_roles:
            vault.delete(f"auth/token/roles/{role}")
            report.removed.append(f"token role {role}")
    for role in vault.list(f"auth/{TICKET_AUTH}/role"):
        if role not in agents:
            vault.delete(f"auth/{TICKET_AUTH}/role/{role}")
            report.removed.append(f"ticket role {role}")
    wanted_policies = {agent_policy(a) for a in agents} | {mint_policy(a) for a in agents}
    for policy in vault.list("sys/policies/acl"):
        managed = policy.startswith((f"{PREFIX}agent-", f"{PREFIX}mint-"))
        if managed and policy not in wanted_policies:
            vault.delete(f"sys/policies/acl/{policy}")
            report.removed.append(f"policy {policy}")


def ensure_tickets(
    vault: Vault, report: Report, public_key: str | None, prune: bool = False
) -> None:
    """The JWT auth method that turns an admission ticket into a minting token, trusting
    `public_key` (the front door's) besides any other deployment's that shares this Vault;
    with `prune`, that key alone. Without a key, the trusted keys are left as they are."""
    auths = (vault.read("sys/auth") or {}).get("data", {})
    present = f"{TICKET_AUTH}/" in auths
    if not present:
        vault.write(f"sys/auth/{TICKET_AUTH}", {"type": "jwt"})
    report.note(f"auth method jwt at {TICKET_AUTH}/", not present)
    if public_key is None:
        report.unchanged.append("ticket key (no AIRLOCK_TICKET_PUBLIC_KEY given; kept)")
        return
    found = (vault.read(f"auth/{TICKET_AUTH}/config", missing_ok=True) or {}).get("data", {})
    trusted = [k.strip() for k in found.get("jwt_validation_pubkeys") or []]
    wanted = [public_key.strip()] if prune else [*trusted, public_key.strip()]
    wanted = list(dict.fromkeys(wanted))
    config: dict[str, object] = {
        "jwt_validation_pubkeys": wanted,
        "jwt_supported_algs": ["EdDSA"],
        "bound_issuer": TICKET_ISSUER,
    }
    _put(vault, report, "ticket key", f"auth/{TICKET_AUTH}/config", config, trusted == wanted)


def _read_key(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"ticket public key {path}: {exc.strerror}") from None


def ensure_ticket_role(vault: Vault, report: Report, agent: Agent) -> None:
    ensure_policy(vault, report, mint_policy(agent.name), mint_rules(agent.name))
    role = {
        "role_type": "jwt",
        "user_claim": "agent",  # one identity per agent role, as the token role's alias
        "bound_claims": {"agent": agent.name},
        "claim_mappings": {"jti": "task_id", "queue": "queue"},
        "token_policies": [mint_policy(agent.name)],
        "token_no_default_policy": True,
        "token_ttl": MINT_TOKEN_TTL,
        "token_max_ttl": MINT_TOKEN_TTL,
        "token_type": "service",
    }
    path = f"auth/{TICKET_AUTH}/role/{agent.name}"
    found = (vault.read(path, missing_ok=True) or {}).get("data", {})
    same = found.get("bound_claims") == role["bound_claims"] and found.get("token_policies") == [
        mint_policy(agent.name)
    ]
    _put(vault, report, f"ticket role {agent.name}", path, role, same)


def ensure_components(vault: Vault, report: Report) -> None:
    """A policy and an AppRole per part of Airlock (worker, gateway, api): renewable
    service tokens of an hour, nothing else attached."""
    auths = (vault.read("sys/auth") or {}).get("data", {})
    present = f"{COMPONENT_AUTH}/" in auths
    if not present:
        vault.write(f"sys/auth/{COMPONENT_AUTH}", {"type": "approle"})
    report.note(f"auth method approle at {COMPONENT_AUTH}/", not present)
    for component, (policy, rules) in COMPONENT_POLICIES.items():
        ensure_policy(vault, report, policy, rules)  # the worker's: the orchestrator policy
        role = {
            "token_policies": [policy],
            "token_no_default_policy": True,
            "token_ttl": COMPONENT_TOKEN_TTL,
            "token_max_ttl": "24h",
            "token_type": "service",
            "secret_id_num_uses": 0,
        }
        path = f"auth/{COMPONENT_AUTH}/role/{component}"
        found = (vault.read(path, missing_ok=True) or {}).get("data", {})
        same = found.get("token_policies") == [policy]
        _put(vault, report, f"approle {component}", path, role, same)


def component_credentials(vault: Vault, component: str) -> tuple[str, str]:
    """The role id and a fresh secret id of a part of Airlock (an administrator's step)."""
    base = f"auth/{COMPONENT_AUTH}/role/{component}"
    role_id = str(((vault.read(f"{base}/role-id") or {}).get("data") or {})["role_id"])
    secret = vault.write(f"{base}/secret-id") or {}
    return role_id, str(secret["data"]["secret_id"])


def register_component_credentials(
    vault: Vault, component: str, role_id: str, secret_ids: list[str]
) -> int:
    """Make `role_id` and `secret_ids` (generated elsewhere, as a deployment's secret files
    are) the AppRole credentials of a part of Airlock; returns how many secret ids were new.
    Idempotent: an id already registered is left as it is."""
    base = f"auth/{COMPONENT_AUTH}/role/{component}"
    vault.write(f"{base}/role-id", {"role_id": role_id})
    new = 0
    for secret_id in secret_ids:
        known = vault.write(f"{base}/secret-id/lookup", {"secret_id": secret_id}, missing_ok=True)
        if not (known or {}).get("data"):
            vault.write(f"{base}/custom-secret-id", {"secret_id": secret_id})
            new += 1
    return new


def setup(
    vault: Vault,
    agents: dict[str, Agent],
    postgres_url: str | None,
    grace_s: int,
    period_s: int,
    prune: bool = False,
    ticket_public_key: Path | None = None,
) -> Report:
    """Bring Vault in line with `agents`; `ticket_public_key` is the front door's (PEM
    file). Raises VaultRefused, ServiceUnavailable, ConfigError (an unreadable key)."""
    report = Report()
    ensure_mount(vault, report, "transit", "transit")
    ensure_jwt_key(vault, report)
    ensure_gateway_ca(vault, report)
    ensure_components(vault, report)
    ensure_tickets(vault, report, _read_key(ticket_public_key), prune)
    for agent in agents.values():
        ensure_agent(vault, report, agent, grace_s, period_s)
        ensure_ticket_role(vault, report, agent)
    needs_db = any(s.kind == "database" for a in agents.values() for s in a.secrets)
    if needs_db and postgres_url:
        ensure_database(vault, report, agents.values(), postgres_url, grace_s)
    elif needs_db:
        report.unchanged.append("database engine (no AIRLOCK_POSTGRES_URL given; skipped)")
    if prune:
        remove_stale(vault, report, agents)
    return report
