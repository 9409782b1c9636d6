"""Airlock's own parts in Vault: each logs in with its own AppRole and narrow policy, is
refused outside it, renews its token before expiry and logs in again when Vault no longer
knows it; a worker on its AppRole runs a database task end to end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from orchestrator.adapters.store import Store
from orchestrator.adapters.ticket import TicketSigner, generate
from orchestrator.adapters.vault.adapter import AppRoleLogin, Vault
from orchestrator.adapters.vault.setup import (
    COMPONENT_AUTH,
    ORCHESTRATOR_POLICY,
    TICKET_AUTH,
    Report,
    component_credentials,
    ensure_tickets,
    mint_policy,
)
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.caller import Identities
from orchestrator.errors import VaultRefused
from orchestrator.submission import Submitter, local_operator
from tests.conftest import running


def login_dir(vault: Vault, component: str, where: Path) -> Path:
    role_id, secret_id = component_credentials(vault, component)
    home = where / component
    home.mkdir(parents=True, exist_ok=True)
    (home / "role_id").write_text(role_id)
    (home / "secret_id").write_text(secret_id)
    return home


def as_component(settings: Settings, vault: Vault, component: str, where: Path) -> Vault:
    home = login_dir(vault, component, where)
    return Vault(settings.vault_addr, None, login=AppRoleLogin.from_dir(home, COMPONENT_AUTH))


def refused(call: Any) -> bool:
    try:
        call()
    except VaultRefused:
        return True
    return False


def test_each_component_is_refused_outside_its_policy(
    settings: Settings, vault: Vault, tmp_path: Path
) -> None:
    worker, gateway, api = (
        as_component(settings, vault, c, tmp_path) for c in ("worker", "gateway", "api")
    )
    me = worker.read("auth/token/lookup-self")["data"]  # type: ignore[index]
    assert me["policies"] == [ORCHESTRATOR_POLICY] and "root" not in me["policies"]
    for client in (worker, gateway, api):
        assert refused(lambda c=client: c.write("sys/policies/acl/evil", {"policy": ""}))
        assert refused(lambda c=client: c.write("auth/token/create", {"policies": ["root"]}))
        assert refused(lambda c=client: c.read("secret/data/airlock-tests/api"))
        assert refused(lambda c=client: c.write("transit/sign/some-other-key", {"input": "eA=="}))
    # No component mints a task token or signs a task JWT with its own token, the worker
    # included: that takes an admission ticket (test below).
    assert refused(lambda: worker.write("auth/token/create/default", {}))
    for client in (worker, gateway, api):
        assert refused(lambda c=client: c.write("auth/token/create/airlock-tester", {}))
        assert refused(lambda c=client: c.write("transit/sign/airlock-task-jwt", {"input": "eA=="}))
    assert refused(lambda: api.write("transit/sign/airlock-audit", {"input": "eA=="}))
    gateway.write("transit/sign/airlock-audit", {"input": "eA=="})  # anchors its audit


def test_minting_takes_the_front_doors_ticket_for_that_agent(
    settings: Settings, vault: Vault, tmp_path: Path
) -> None:
    """A ticket logs in as the agent it names and may mint that agent's task token and sign
    task JWTs, nothing else; a ticket for another agent, another key's ticket, an expired
    one, and a ticket without an agent are refused by Vault itself."""
    task_id = str(uuid.uuid4())
    me = Identities(local_operator(), None)
    signer = TicketSigner(settings.ticket_key)
    spec = {"agent": "tester", "command": ["true"]}
    ticket = signer.sign(task_id, spec, settings.queue, me)
    login = f"auth/{TICKET_AUTH}/login"
    minting = vault.write(login, {"role": "tester", "jwt": ticket})["auth"]  # type: ignore[index]
    assert minting["policies"] == [mint_policy("tester")]
    assert minting["metadata"]["task_id"] == task_id
    assert int(minting["lease_duration"]) <= 300
    as_ticket = minting["client_token"]
    made = vault.write("auth/token/create/airlock-tester", {"ttl": "30s"}, token=as_ticket)
    vault.write("auth/token/revoke", {"token": made["auth"]["client_token"]})  # type: ignore[index]
    vault.write("transit/sign/airlock-task-jwt", {"input": "eA=="}, token=as_ticket)
    for path, body in (
        ("auth/token/create/airlock-dba", {}),
        ("auth/token/create", {"policies": ["airlock-agent-dba"]}),
        ("secret/data/airlock-tests/api", None),
        ("transit/sign/airlock-audit", {"input": "eA=="}),
    ):
        call = vault.read if body is None else lambda p, b=body, **kw: vault.write(p, b, **kw)
        assert refused(lambda c=call, p=path: c(p, token=as_ticket)), path
    # Another agent's role, another key, no agent, and an old ticket: no login at all.
    assert refused(lambda: vault.write(login, {"role": "dba", "jwt": ticket}))
    generate(tmp_path / "other.key", tmp_path / "other.pub")
    forged = TicketSigner(tmp_path / "other.key").sign(task_id, spec, settings.queue, me)
    assert refused(lambda: vault.write(login, {"role": "tester", "jwt": forged}))
    agentless = signer.sign(task_id, ["not", "a", "spec"], settings.queue, me)
    assert refused(lambda: vault.write(login, {"role": "tester", "jwt": agentless}))
    now = int(time.time())
    old = jwt.encode(
        {**jwt.decode(ticket, options={"verify_signature": False}), "exp": now - 3600},
        serialization.load_pem_private_key(settings.ticket_key.read_bytes(), None),  # type: ignore[union-attr]
        algorithm="EdDSA",
    )
    assert refused(lambda: vault.write(login, {"role": "tester", "jwt": old}))
    vault.write("auth/token/revoke-self", token=as_ticket)


def test_deployments_sharing_a_vault_keep_each_others_ticket_key(
    settings: Settings, vault: Vault, tmp_path: Path
) -> None:
    """vault setup adds its ticket key to those trusted; --prune leaves it alone trusted."""
    generate(tmp_path / "other.key", tmp_path / "other.pub")
    other = (tmp_path / "other.pub").read_text()
    config = f"auth/{TICKET_AUTH}/config"
    before = vault.read(config)["data"]["jwt_validation_pubkeys"]  # type: ignore[index]
    try:
        ensure_tickets(vault, Report(), other)
        trusted = vault.read(config)["data"]["jwt_validation_pubkeys"]  # type: ignore[index]
        assert len(trusted) == len(before) + 1
        spec = {"agent": "tester", "command": ["true"]}
        me = Identities(local_operator(), None)
        for key in (settings.ticket_key, tmp_path / "other.key"):
            ticket = TicketSigner(key).sign(str(uuid.uuid4()), spec, settings.queue, me)
            login = vault.write(f"auth/{TICKET_AUTH}/login", {"role": "tester", "jwt": ticket})
            vault.write("auth/token/revoke-self", token=login["auth"]["client_token"])  # type: ignore[index]
    finally:
        vault.write(
            config,
            {
                "jwt_validation_pubkeys": before,
                "jwt_supported_algs": ["EdDSA"],
                "bound_issuer": "airlock-front-door",
            },
        )


@pytest.fixture
def short_role(vault: Vault, tmp_path: Path) -> Iterator[AppRoleLogin]:
    """A role whose tokens live 2 s (renewable up to 4 s), to watch renewal happen."""
    name = f"short-{uuid.uuid4().hex[:8]}"
    base = f"auth/{COMPONENT_AUTH}/role/{name}"
    vault.write(
        base,
        {
            "token_policies": [ORCHESTRATOR_POLICY],
            "token_no_default_policy": True,
            "token_ttl": "2s",
            "token_max_ttl": "4s",
        },
    )
    role_id = vault.read(f"{base}/role-id")["data"]["role_id"]  # type: ignore[index]
    secret_id = vault.write(f"{base}/secret-id")["data"]["secret_id"]  # type: ignore[index]
    yield AppRoleLogin(COMPONENT_AUTH, role_id, secret_id)
    vault.delete(base)


def test_tokens_are_renewed_and_acquired_again(
    settings: Settings, vault: Vault, short_role: AppRoleLogin
) -> None:
    client = Vault(settings.vault_addr, None, login=short_role)
    client.ping()
    first = client.token
    time.sleep(1.5)  # past two thirds of its 2 s: the next call renews it first
    client.ping()
    assert client.token == first
    time.sleep(3)  # past its 4 s maximum: a new login
    client.ping()
    second = client.token
    assert second != first
    # Vault forgets the token (a restart of a dev server, an operator's revoke): the next
    # call logs in again instead of failing.
    vault.write("auth/token/revoke", {"token": second})
    client.ping()
    assert client.token not in (first, second)


def test_a_worker_on_its_approle_runs_a_database_task(
    settings: Settings, vault: Vault, store: Store, tmp_path: Path
) -> None:
    home = login_dir(vault, "worker", tmp_path)
    ns = f"{settings.namespace}-approle"
    scoped = replace(settings, namespace=ns, queue=ns)
    with running(
        scoped,
        "worker",
        "--concurrency",
        "1",
        log=f"worker-{ns}",
        AIRLOCK_VAULT_APPROLE_WORKER=str(home),
        VAULT_TOKEN="not-a-token",  # nothing but the AppRole to fall back on
    ):
        scoped_store = Store(settings.redis_url, ns)
        query = (
            "python3 -c \"import airlock_task; print(sorted(airlock_task.secret('reports-db')))\""
        )
        task_id = Submitter(scoped, scoped_store).submit(
            {"agent": "dba", "command": ["sh", "-c", query]}
        )
        done = Client(scoped, scoped_store).wait(task_id, 120)
    assert done["state"] == "succeeded", done
    assert done["revocation"]["verified"] is True and done["revocation"]["leases"]
    for key in scoped_store.redis.scan_iter(f"{ns}:*"):
        scoped_store.redis.delete(key)


def test_credentials_a_deployment_generated_are_registered_once(
    vault: Vault, settings: Settings
) -> None:
    """A compose stack's secret files hold the AppRole ids; Vault takes them as given."""
    from orchestrator.adapters.vault.setup import register_component_credentials

    base = f"auth/{COMPONENT_AUTH}/role/gateway"
    original = (vault.read(f"{base}/role-id") or {})["data"]["role_id"]
    role_id, secret_ids = str(uuid.uuid4()), [str(uuid.uuid4()), str(uuid.uuid4())]
    try:
        assert register_component_credentials(vault, "gateway", role_id, secret_ids) == 2
        assert register_component_credentials(vault, "gateway", role_id, secret_ids) == 0
        for secret_id in secret_ids:  # one per host: each logs in on its own
            login = Vault(
                settings.vault_addr,
                None,
                login=AppRoleLogin(COMPONENT_AUTH, role_id, secret_id),
            )
            assert login.read("auth/token/lookup-self")["data"]["policies"] == ["airlock-gateway"]
        wrong = Vault(
            settings.vault_addr, None, login=AppRoleLogin(COMPONENT_AUTH, role_id, "guessed")
        )
        assert refused(lambda: wrong.read("auth/token/lookup-self"))
    finally:
        for secret_id in secret_ids:
            vault.write(f"{base}/secret-id/destroy", {"secret_id": secret_id})
        vault.write(f"{base}/role-id", {"role_id": original})
