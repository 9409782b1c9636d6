"""The local stack's OIDC issuer: OpenBao's identity tokens (`identity/oidc`).

Users log in with userpass, machine callers with AppRole; each is an identity entity whose
name is the caller's name and whose metadata says its kind. A token's `username` and
`kind` claims come from that entity, so the issuer, not the caller, says who is calling:

    alice    a user who may run `demo`, `researcher`, `coder` and `ops` (policies/callers.yaml)
    mallory  a user who may run nothing
    oncall   an operator: runs nothing, reads every task (the console's ops view)
    ci-bot   an upstream service (AppRole) that may act for alice with her token

`dev_token` mints a fresh token for one of them with the operator's Vault token (a new
password or AppRole secret id each time, so no password is stored anywhere): for the local
stack only.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from orchestrator.adapters.vault.adapter import Vault
from orchestrator.errors import ConfigError

USERS_MOUNT = "airlock-users"
SERVICES_MOUNT = "airlock-services"
KEY = "airlock-api"
ROLE = "airlock-api"
POLICY = "airlock-api-caller"
USERS = ("alice", "mallory", "oncall")
SERVICES = ("ci-bot",)
TOKEN_TTL = "15m"
# The placeholders go in unquoted: OpenBao renders each as a JSON string.
TEMPLATE = '{"username": {{identity.entity.name}}, "kind": {{identity.entity.metadata.kind}}}'


@dataclass(frozen=True)
class IssuerInfo:
    url: str
    audience: str


def issuer_url(vault_addr: str) -> str:
    return f"{vault_addr.rstrip('/')}/v1/identity/oidc"


def _accessor(vault: Vault, mount: str, kind: str) -> str:
    mounts = (vault.read("sys/auth") or {}).get("data") or {}
    if f"{mount}/" not in mounts:
        vault.write(f"sys/auth/{mount}", {"type": kind})
        mounts = (vault.read("sys/auth") or {}).get("data") or {}
    return str(mounts[f"{mount}/"]["accessor"])


def _entity(vault: Vault, name: str, kind: str, accessor: str, alias: str) -> None:
    entity = vault.write("identity/entity", {"name": name, "metadata": {"kind": kind}}) or {}
    entity_id = (entity.get("data") or {}).get("id")
    if entity_id is None:  # it existed: writing by name updates it
        vault.write(f"identity/entity/name/{name}", {"metadata": {"kind": kind}})
        entity_id = ((vault.read(f"identity/entity/name/{name}") or {}).get("data") or {})["id"]
    lookup = vault.write(
        "identity/lookup/entity", {"alias_name": alias, "alias_mount_accessor": accessor}
    )
    if not (lookup or {}).get("data"):
        vault.write(
            "identity/entity-alias",
            {"name": alias, "canonical_id": entity_id, "mount_accessor": accessor},
        )


def ensure_issuer(vault: Vault, audience: str) -> IssuerInfo:
    """Make OpenBao the issuer of callers' tokens for `audience`, with the local callers.
    Idempotent."""
    users = _accessor(vault, USERS_MOUNT, "userpass")
    services = _accessor(vault, SERVICES_MOUNT, "approle")
    vault.write(
        f"identity/oidc/key/{KEY}",
        {
            "algorithm": "ES256",
            "allowed_client_ids": ["*"],
            "rotation_period": "24h",
            "verification_ttl": "48h",
        },
    )
    vault.write(
        f"identity/oidc/role/{ROLE}",
        {"key": KEY, "ttl": TOKEN_TTL, "client_id": audience, "template": TEMPLATE},
    )
    rule = f'path "identity/oidc/token/{ROLE}" {{ capabilities = ["read"] }}'
    vault.write(f"sys/policies/acl/{POLICY}", {"policy": rule})
    for user in USERS:
        vault.write(
            f"auth/{USERS_MOUNT}/users/{user}",
            {"password": secrets.token_urlsafe(24), "token_policies": [POLICY], "token_ttl": "5m"},
        )
        _entity(vault, user, "user", users, user)
    for service in SERVICES:
        vault.write(
            f"auth/{SERVICES_MOUNT}/role/{service}",
            {"token_policies": [POLICY], "token_ttl": "5m", "secret_id_ttl": "10m"},
        )
        role_id = ((vault.read(f"auth/{SERVICES_MOUNT}/role/{service}/role-id") or {})["data"])[
            "role_id"
        ]
        _entity(vault, service, "service", services, role_id)
    return IssuerInfo(issuer_url(vault.addr), audience)


def dev_token(vault: Vault, name: str) -> str:
    """A fresh caller token for a local user or service. Raises ConfigError for others."""
    if name in USERS:
        password = secrets.token_urlsafe(24)
        vault.write(f"auth/{USERS_MOUNT}/users/{name}/password", {"password": password})
        login = vault.write(f"auth/{USERS_MOUNT}/login/{name}", {"password": password})
    elif name in SERVICES:
        role = f"auth/{SERVICES_MOUNT}/role/{name}"
        role_id = ((vault.read(f"{role}/role-id") or {})["data"])["role_id"]
        secret_id = ((vault.write(f"{role}/secret-id", {}) or {})["data"])["secret_id"]
        login = vault.write(
            f"auth/{SERVICES_MOUNT}/login", {"role_id": role_id, "secret_id": secret_id}
        )
    else:
        known = ", ".join((*USERS, *SERVICES))
        raise ConfigError(f"{name!r} is not a local caller (local callers: {known})")
    caller_token = str((login or {})["auth"]["client_token"])
    answer = vault.read(f"identity/oidc/token/{ROLE}", token=caller_token) or {}
    return str(answer["data"]["token"])
