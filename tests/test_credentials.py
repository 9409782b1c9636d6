"""Task credentials on real OpenBao and PostgreSQL: minted per task, delivered sealed,
revoked and verified at the end, and revoked by the reaper when a worker dies."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import wiring
from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.runtime.docker_engine import DockerRuntime
from orchestrator.adapters.store import Store
from orchestrator.adapters.ticket import TicketSigner
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.broker import MINTING, WRAPPING
from orchestrator.adapters.vault.identity import (
    InvalidToken,
    JwksServer,
    Minter,
    Verifier,
    b64url,
    b64url_decode,
    fetch_jwks_url,
    jwks_from_transit,
)
from orchestrator.adapters.vault.setup import JWT_KEY
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.caller import Identities
from orchestrator.core.grant import Grant
from orchestrator.core.lifecycle import TaskState
from orchestrator.core.spec import parse
from orchestrator.errors import VaultRefused
from orchestrator.submission import local_operator
from orchestrator.task.credentials import Credentials
from orchestrator.task.executor import Executor
from tests.conftest import ROOT, airlock, airlock_env

S = TaskState
READ_SECRETS = r"""
import json, airlock_task
db = airlock_task.secret("reports-db")
print(sorted(db), db["host"], db["port"], db["database"])
print("kv", airlock_task.secret("api-key")["key"].startswith("kv-"))
print("jwt", airlock_task.token().count("."))
"""
QUERY = (
    'export PGPASSWORD="$(python3 -c \'import airlock_task; print(airlock_task.secret("reports-db")["password"])\')"; '
    'U="$(python3 -c \'import airlock_task; print(airlock_task.secret("reports-db")["username"])\')"; '
    'psql -h 127.0.0.1 -U "$U" -d airlock -tAc "SELECT service FROM incidents ORDER BY id LIMIT 1"'
)


def postgres_roles(prefix: str = "v-token-") -> set[str]:
    out = subprocess.run(
        [
            "su",
            "postgres",
            "-c",
            f"psql -tAc \"SELECT rolname FROM pg_roles WHERE rolname LIKE '{prefix}%'\"",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


class Spy:
    """Records what the real broker hands out, so the test can hunt for it afterwards."""

    def __init__(self, credentials: Credentials) -> None:
        self.values: list[str] = []
        self._unwrap = credentials.broker.unwrap
        credentials.broker.unwrap = self.unwrap  # type: ignore[method-assign]
        self.credentials = credentials

    def unwrap(self, wrap_token: str) -> dict[str, Any]:
        answer = self._unwrap(wrap_token)
        self.values += [str(v) for k, v in answer["data"].items() if k in ("password", "key")]
        return answer

    def close(self) -> None:
        self.credentials.broker.unwrap = self._unwrap  # type: ignore[method-assign]


def run_task(
    executor: Executor, ticketed: bool = False, **spec: Any
) -> tuple[TaskState, dict[str, Any], str]:
    """Run a dba task; `ticketed`: with the front door's admission ticket, as a worker gets
    it from the queue (what lets a worker's own narrow Vault token mint)."""
    task_id = str(uuid.uuid4())
    data = {"agent": "dba", "timeout_s": 60, **spec}
    ticket = None
    if ticketed:
        me = Identities(local_operator(), None)
        ticket = TicketSigner(executor.settings.ticket_key).sign(
            task_id, data, executor.settings.queue, me
        )
    state = executor.execute(task_id, data, None, None, ticket)
    status = Client(executor.settings).status(task_id)
    logs = "".join(text for _, text in Client(executor.settings).logs(task_id))
    return state, status, logs


def test_database_task_queries_postgres_and_everything_is_revoked(
    executor: Executor, vault: Vault
) -> None:
    before = postgres_roles()
    state, status, logs = run_task(executor, command=["sh", "-c", QUERY])
    assert state is S.SUCCEEDED, (status["reason"], logs)
    assert logs == "checkout\n"
    receipt = status["revocation"]
    assert receipt["verified"] is True and receipt["endpoint_removed"] is True
    [lease] = receipt["leases"]
    assert lease["id"].startswith("database/creds/airlock-tests-readonly/") and lease["verified"]
    assert receipt["token"]["verified"] and receipt["jwt"]["jti"] == status["jwt_jti"]
    with pytest.raises(VaultRefused):
        vault.write("auth/token/lookup-accessor", {"accessor": receipt["token"]["accessor"]})
    with pytest.raises(VaultRefused):
        vault.write("sys/leases/lookup", {"lease_id": lease["id"]})
    assert postgres_roles() <= before  # the task's database role was dropped
    assert not (
        executor.settings.endpoint_dir / executor.settings.namespace / status["id"]
    ).exists()


def test_wrapped_copies_a_task_never_took_are_revoked_with_it(
    executor: Executor, credentials: Credentials, store: Store, vault: Vault
) -> None:
    """A task that dies before it unwraps: its wrapped secrets must not outlive it."""
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "dba"})
    grant = executor.policy.admit(parse({"agent": "dba", "command": ["true"]})).grant
    assert grant is not None
    handout = credentials.provision(task_id, grant, grant.digest(), time.time() + 60)
    tokens = [s.token for s in handout.provisioned.secrets]
    assert len(tokens) == 2 and all(
        vault.write("sys/wrapping/lookup", {"token": t}) for t in tokens
    )
    receipt = credentials.revoke(task_id)
    assert receipt["verified"] is True
    assert len(receipt["wrapped"]) == 2 and all(w["verified"] for w in receipt["wrapped"])
    for token in tokens:
        with pytest.raises(VaultRefused):
            vault.write("sys/wrapping/lookup", {"token": token})
    assert store.journaled(task_id) == ({}, set())


def test_secrets_land_only_in_the_containers_tmpfs(
    executor: Executor, store: Store, runtime: DockerRuntime, credentials: Credentials
) -> None:
    """Hunt for the secret values everywhere they must not be."""
    spy = Spy(credentials)
    task_id = str(uuid.uuid4())
    seen: dict[str, Any] = {}

    def inspect_while_running() -> None:
        for event in _wait_for_state(store, task_id, S.RUNNING):
            container_id = store.get(task_id)["container_id"]
            seen["inspect"] = json.dumps(runtime.api.inspect_container(container_id))
            top = runtime.api.exec_create(container_id, ["cat", "/proc/1/environ"])
            seen["environ"] = runtime.api.exec_start(top["Id"]).decode(errors="replace")
            seen["dirs"] = [
                runtime.api.inspect_container(container_id)["GraphDriver"]["Data"].get(
                    "UpperDir", ""
                ),
                f"/var/lib/docker/containers/{container_id}",
            ]
            return event

    watcher = threading.Thread(target=inspect_while_running)
    watcher.start()
    script = READ_SECRETS + "\nimport time\ntime.sleep(3)\n"
    try:
        state = executor.execute(task_id, {"agent": "dba", "command": ["python3", "-c", script]})
    finally:
        watcher.join(timeout=30)
        spy.close()
    assert state is S.SUCCEEDED, store.get(task_id)["reason"]
    logs = "".join(t for _, t in store.iter_logs(task_id))
    assert "['database', 'host', 'password', 'port', 'username'] 127.0.0.1 5432 airlock" in logs
    assert "kv True" in logs and "jwt 2" in logs
    assert len(spy.values) == 2 and all(len(v) >= 8 for v in spy.values)
    redis_dump = "".join(
        json.dumps(store.redis.hgetall(k))
        if store.redis.type(k) == "hash"
        else str(store.redis.dump(k))
        for k in store.redis.scan_iter("*")
    )
    places = {
        "docker inspect": seen["inspect"],
        "container environment": seen["environ"],
        "logs": logs,
        "redis": redis_dump,
    }
    for value in spy.values:
        for where, text in places.items():
            assert value not in text, f"secret found in {where}"
        found = subprocess.run(
            [
                "grep",
                "-rlF",
                value,
                *[d for d in seen["dirs"] if d],
                str(executor.settings.endpoint_dir),
                str(ROOT / ".airlock"),
            ],
            capture_output=True,
            text=True,
        )
        assert found.stdout == "", f"secret found in host files: {found.stdout}"
    # Every hand-out is audited: the static one says it outlives the task.
    credentials.audit.flush()
    handed = {
        r["rule"]: r["reason"]
        for r in AuditLog(store).records(task_id)
        if r.get("method") == "BOOTSTRAP"
    }
    assert "stays valid after the task ends" in handed["secret:api-key"]
    assert "revoked with the task" in handed["secret:reports-db"]


def _wait_for_state(store: Store, task_id: str, state: TaskState, limit_s: float = 30):  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if store.redis.exists(store.key(task_id)) and store.get(task_id)["state"] == state.value:
            yield state
            return
        time.sleep(0.02)


def test_a_task_that_reads_nothing_from_vault_is_given_no_vault_token(
    executor: Executor, store: Store, vault: Vault
) -> None:
    """Nothing would use it: a grant without secrets or injected credentials mints no Vault
    token, not even for the time the task runs; its JWT is minted and revoked as ever."""
    before = set(vault.list("auth/token/accessors"))
    task_id = str(uuid.uuid4())
    ended: list[TaskState] = []
    worker = threading.Thread(
        target=lambda: ended.append(
            executor.execute(task_id, {"agent": "tester", "command": ["sleep", "2"]})
        )
    )
    worker.start()
    try:
        assert list(_wait_for_state(store, task_id, S.RUNNING, limit_s=60)) == [S.RUNNING]
        minted = {}
        for accessor in set(vault.list("auth/token/accessors")) - before:
            found = vault.write(
                "auth/token/lookup-accessor", {"accessor": accessor}, absent_ok=True
            )
            minted[accessor] = ((found or {}).get("data") or {}).get("meta") or {}
        assert not [a for a, meta in minted.items() if meta.get("task_id") == task_id]
        assert "token_accessor" not in store.journaled(task_id)[0]
    finally:
        worker.join(timeout=60)
    status = Client(executor.settings).status(task_id)
    assert ended == [S.SUCCEEDED], status
    receipt = status["revocation"]
    assert receipt["verified"] and receipt["token"] is None and receipt["leases"] == []
    assert receipt["jwt"]["jti"] == status["jwt_jti"]


SECOND_BOOTSTRAP = r"""
import json, socket
def call(path, body):
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect("/run/airlock-endpoint/airlock.sock")
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: airlock\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (path.encode(), len(payload), payload))
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split()[1].decode(), json.loads(body or b"{}").get("error", "allowed")
print("second bootstrap:", *call("/v1/bootstrap", {}))
print("foreign token:", *call("/v1/wrapping/unwrap", {"token": "s.forged"}))
"""


def test_second_bootstrap_and_foreign_tokens_are_refused_and_recorded(
    executor: Executor, store: Store
) -> None:
    state, status, logs = run_task(executor, command=["python3", "-c", SECOND_BOOTSTRAP])
    assert state is S.SUCCEEDED, logs
    assert "second bootstrap: 409 bootstrap already fetched" in logs
    assert "foreign token: 403 not a wrapping token of this task" in logs
    alarms = [a["alarm"] for a in store.alarms(status["id"])]
    assert "second bootstrap fetch refused" in alarms
    assert "/v1/wrapping/unwrap with a token not given to this task" in alarms


def test_a_used_wrapping_token_is_detected(credentials: Credentials, vault: Vault) -> None:
    token = vault.write("sys/wrapping/wrap", {"secret": {"x": "y"}}, wrap_ttl="60s")
    wrap = token["wrap_info"]["token"]  # type: ignore[index]
    assert credentials.broker.lookup_wrapping(wrap)["creation_path"] == "sys/wrapping/wrap"
    assert credentials.broker.unwrap(wrap)["data"] == {"x": "y"}
    with pytest.raises(VaultRefused, match="wrapping token is not valid"):
        credentials.broker.unwrap(wrap)
    with pytest.raises(VaultRefused):
        credentials.broker.lookup_wrapping(wrap)


def test_vault_unreachable_at_provision(
    settings: Settings, store: Store, runtime: DockerRuntime
) -> None:
    cut_off = replace(settings, vault_addr="http://127.0.0.1:1")
    credentials = wiring.credentials(cut_off, store)
    try:
        executor = Executor(cut_off, store, runtime, credentials=credentials)
        state, status, _ = run_task(executor, command=["true"])
    finally:
        credentials.endpoints.shutdown()
    assert state is S.FAILED
    assert status["reason"].startswith("error: vault is unreachable: http://127.0.0.1:1")
    # (its container may have been created meanwhile; it was never started, and is gone)
    assert all(c.task_id != status["id"] for c in runtime.list_managed(settings.namespace))
    assert not (cut_off.endpoint_dir / cut_off.namespace / status["id"]).exists()


def test_worker_killed_mid_task_is_cleaned_up_by_the_reaper(
    settings: Settings, store: Store, runtime: DockerRuntime, vault: Vault, tmp_path: Path
) -> None:
    queue = f"{settings.queue}-doomed"
    env = airlock_env(
        settings, AIRLOCK_QUEUE=queue, AIRLOCK_HEARTBEAT_S="0.5", TMPDIR=str(tmp_path)
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "-c", "1", "--loglevel", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = Client(replace(settings, queue=queue))
        task_id = client.submit({"agent": "dba", "command": ["sleep", "120"], "timeout_s": 200})
        assert list(_wait_for_state(store, task_id, S.RUNNING, limit_s=60)) == [S.RUNNING]
        accessor = store.journaled(task_id)[0]["token_accessor"]
        journaled = store.journaled(task_id)[1]
        wrapping = {e.removeprefix(WRAPPING) for e in journaled if e.startswith(WRAPPING)}
        [lease] = journaled - {WRAPPING + w for w in wrapping}
        assert len(wrapping) == 2  # one wrapped copy per secret, journaled before handover
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        while store.has_owner(task_id):  # the heartbeat lapses within 3 beats
            time.sleep(0.1)
        gc = airlock(settings, "gc", "--json")
        assert gc.returncode == 0, gc.stderr
        kinds = {(r["kind"], r["task_id"]) for r in json.loads(gc.stdout)}
        assert {("container", task_id), ("credentials", task_id)} <= kinds
        assert all(c.task_id != task_id for c in runtime.list_managed(settings.namespace))
        record = store.get(task_id)
        assert record["state"] == "failed"
        assert record["reason"] == "reaped: container its worker stopped sending heartbeats"
        assert json.loads(record["revocation"])["verified"] is True
        with pytest.raises(VaultRefused):
            vault.write("auth/token/lookup-accessor", {"accessor": accessor})
        with pytest.raises(VaultRefused):
            vault.write("sys/leases/lookup", {"lease_id": lease})
        for accessor in wrapping:
            with pytest.raises(VaultRefused):
                vault.write("auth/token/lookup-accessor", {"accessor": accessor})
        assert store.journaled(task_id) == ({}, set())
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)


# --- task JWTs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grant() -> Grant:
    return Grant.build(
        "dba",
        identity="spiffe://airlock.test/agent/dba",
        on_behalf_of="alice",
        image="i",
        timeout_s=60,
        limits={"cpus": 1, "memory": 1 << 28, "pids": 64},
    )


def verifier(
    credentials: Credentials,
    live: bool = True,
    clock: Any = time.time,
    audience: str = "airlock-gateway",
) -> Verifier:
    return Verifier(credentials.jwks, audience, credentials.issuer, lambda t, j: live, clock=clock)


def test_jwt_claims_and_offline_verification(credentials: Credentials, grant: Grant) -> None:
    """RFC 8693's shape: the user is the subject, the agent the actor, and the service that
    submitted for the user the actor's actor."""
    deadline = time.time() + 60
    token = credentials.minter.mint(
        "task-1", grant, grant.digest(), deadline, submitter="service:ci-bot"
    )
    claims = verifier(credentials).verify(token.jwt)
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": grant.identity, "act": {"sub": "service:ci-bot"}}
    assert grant.identity == "spiffe://airlock.test/agent/dba"
    assert claims["submitter"] == "service:ci-bot"
    assert claims["aud"] == "airlock-gateway" and claims["iss"] == credentials.issuer
    assert claims["exp"] <= deadline and claims["iat"] <= time.time()
    assert claims["task_id"] == "task-1" and claims["grant_hash"] == grant.digest()
    assert claims["jti"] == token.jti
    # The user submitting for themselves: no service in the chain.
    own = credentials.minter.mint("task-1", grant, grant.digest(), deadline, submitter="user:alice")
    assert verifier(credentials).verify(own.jwt)["act"] == {"sub": grant.identity}
    # No user: the agent is the subject, and nobody acts for anyone.
    alone = grant.model_copy(update={"on_behalf_of": None})
    claims = verifier(credentials).verify(
        credentials.minter.mint("task-1", alone, alone.digest(), deadline).jwt
    )
    assert claims["sub"] == grant.identity and "act" not in claims


def test_jwt_failures(credentials: Credentials, grant: Grant, vault: Vault) -> None:
    token = credentials.minter.mint("task-2", grant, grant.digest(), time.time() + 60).jwt
    head, body, sig = token.split(".")
    claims = json.loads(b64url_decode(body))
    forged = b64url(json.dumps({**claims, "task_id": "someone-elses-task"}).encode())
    cases = {
        "wrong audience": (verifier(credentials, audience="someone-else"), token),
        "expired": (verifier(credentials, clock=lambda: time.time() + 3600), token),
        "bad signature": (verifier(credentials), f"{head}.{forged}.{sig}"),
        "task is no longer live": (verifier(credentials, live=False), token),
        "malformed token": (verifier(credentials), "not-a-jwt"),
    }
    for reason, (check, candidate) in cases.items():
        with pytest.raises(InvalidToken, match=reason):
            check.verify(candidate)
    vault.write("transit/keys/airlock-test-stranger", {"type": "ecdsa-p256"})
    stranger = Minter(vault, credentials.issuer, "airlock-gateway", key="airlock-test-stranger")
    stranger_token = stranger.mint("task-3", grant, grant.digest(), time.time() + 60).jwt
    with pytest.raises(InvalidToken, match="unknown signing key"):
        verifier(credentials).verify(stranger_token)


def kid_of(token: str) -> str:
    return str(json.loads(b64url_decode(token.split(".")[0]))["kid"])


def test_key_rotation_is_picked_up(credentials: Credentials, grant: Grant, vault: Vault) -> None:
    check = verifier(credentials)
    old = credentials.minter.mint("task-4", grant, grant.digest(), time.time() + 60).jwt
    check.verify(old)  # caches the JWKS as it is now
    vault.write(f"transit/keys/{JWT_KEY}/rotate")
    fresh_minter = Minter(vault, credentials.issuer, "airlock-gateway")
    new = fresh_minter.mint("task-5", grant, grant.digest(), time.time() + 60).jwt
    assert kid_of(new) != kid_of(old)
    assert check.verify(new)["task_id"] == "task-5"  # unknown kid: JWKS fetched again
    assert check.verify(old)["task_id"] == "task-4"  # old versions still verify
    assert len(jwks_from_transit(vault.read(f"transit/keys/{JWT_KEY}")["data"])["keys"]) >= 2  # type: ignore[index]


def test_a_task_jwt_dies_with_its_task(executor: Executor, store: Store) -> None:
    """The JWT a task was given stops verifying the moment the task ends."""
    check = executor.credentials.verifier()
    tokens: list[str] = []
    original = executor.credentials.provision

    def keep(*args: Any, **kwargs: Any) -> Any:
        handout = original(*args, **kwargs)
        tokens.append(handout.provisioned.jwt.jwt)
        assert check.verify(tokens[-1])["task_id"] == args[0]  # live while provisioning
        return handout

    executor.credentials.provision = keep  # type: ignore[method-assign]
    try:
        state, _, _ = run_task(executor, command=["true"])
    finally:
        executor.credentials.provision = original  # type: ignore[method-assign]
    assert state is S.SUCCEEDED
    with pytest.raises(InvalidToken, match="task is no longer live"):
        check.verify(tokens[0])


def test_planted_journal_entries_are_ignored_and_alarmed(
    executor: Executor, credentials: Credentials, store: Store, vault: Vault
) -> None:
    """Someone who can write the journal in Redis names another task's token, a foreign
    wrapping accessor and leases this task was never given: the worker revokes none of
    them, drops them, and raises an alarm for each; the task's own credentials still go."""
    victim = vault.write("auth/token/create", {"meta": {"task_id": "someone-else"}, "ttl": "10m"})
    victim_accessor = victim["auth"]["accessor"]  # type: ignore[index]
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "dba"})
    grant = executor.policy.admit(parse({"agent": "dba", "command": ["true"]})).grant
    assert grant is not None
    store.update(task_id, {"grant": grant.canonical_json()})
    credentials.provision(task_id, grant, grant.digest(), time.time() + 60)
    planted = [
        f"wrapping:{victim_accessor}",
        "sys/raw/core/master",
        "database/creds/some-other-role/abc123",
    ]
    for lease in planted:
        store.journal_lease(task_id, lease)
    receipt = credentials.revoke(task_id)
    assert {i["why"] for i in receipt["ignored"]} == {
        "not a wrapping token",
        "not a lease of a dynamic secret",
        "a lease of role 'some-other-role', which this task was not granted",
    }
    assert receipt["verified"] is False  # a tampered journal is never a clean receipt
    assert receipt["token"]["verified"] is True  # the task's own token went all the same
    assert vault.write("auth/token/lookup-accessor", {"accessor": victim_accessor})  # alive
    alarms = [a["alarm"] for a in store.alarms(task_id)]
    assert len([a for a in alarms if "journal entry" in a]) == 3
    assert store.journaled(task_id) == ({}, set())  # dropped, never retried by the reaper

    # The task token's accessor swapped for another task's: refused the same way.
    other = str(uuid.uuid4())
    store.create(other, {"agent": "dba"})
    credentials.provision(other, grant, grant.digest(), time.time() + 60)
    own = store.journaled(other)[0]["token_accessor"]
    store.journal(other, token_accessor=victim_accessor)
    receipt = credentials.revoke(other)
    assert "not this one" in receipt["token"]["ignored"] and receipt["verified"] is False
    assert store.journaled(other)[0] == {}  # dropped: the reaper will not try it again
    assert vault.write("auth/token/lookup-accessor", {"accessor": victim_accessor})
    vault.write("auth/token/revoke-accessor", {"accessor": own})
    vault.write("auth/token/revoke-accessor", {"accessor": victim_accessor})


def test_a_ticket_login_the_worker_could_not_let_go_dies_with_the_task(
    credentials: Credentials, store: Store, vault: Vault, settings: Settings
) -> None:
    """The login with an admission ticket is journaled the moment Vault answers: a worker
    that let it go itself leaves no entry; one that died or lost Vault before it could
    leaves it to the task's teardown (or the reaper), which revokes and verifies it. An
    entry naming someone else's token, or another task's login, is ignored and alarmed."""
    me = Identities(local_operator(), None)
    signer = TicketSigner(settings.ticket_key)
    broker = credentials.broker

    def admitted() -> tuple[str, str]:
        task_id = str(uuid.uuid4())
        spec = {"agent": "dba", "command": ["true"]}
        store.create(task_id, spec)
        return task_id, signer.sign(task_id, spec, settings.queue, me)

    task_id, ticket = admitted()
    _, entry = broker._log_in_with(task_id, ticket, "dba")  # the worker dies right here
    assert entry.startswith(MINTING) and entry in store.journaled(task_id)[1]
    accessor = entry.removeprefix(MINTING)
    assert vault.write("auth/token/lookup-accessor", {"accessor": accessor})
    receipt = credentials.revoke(task_id)
    assert (
        receipt["minting"] == [{"accessor": accessor, "revoked": True, "verified": True}]
        and receipt["verified"] is True
    )
    with pytest.raises(VaultRefused):
        vault.write("auth/token/lookup-accessor", {"accessor": accessor})
    assert store.journaled(task_id) == ({}, set())

    # Planted: a token that is no ticket login, and another task's ticket login.
    victim = vault.write("auth/token/create", {"meta": {"task_id": task_id}, "ttl": "10m"})
    victim_accessor = victim["auth"]["accessor"]  # type: ignore[index]
    other_id, other_ticket = admitted()
    other_token, other_entry = broker._log_in_with(other_id, other_ticket, "dba")
    store.journal_lease(task_id, MINTING + victim_accessor)
    store.journal_lease(task_id, other_entry)
    receipt = credentials.revoke(task_id)
    assert sorted(i["why"] for i in receipt["ignored"]) == [
        f"a token of task {other_id!r}, not this one",
        "not a login with an admission ticket",
    ]
    assert receipt["verified"] is False
    assert vault.write("auth/token/lookup-accessor", {"accessor": victim_accessor})
    broker._let_go(other_id, other_token, other_entry)  # and the other worker lets its go
    assert store.journaled(other_id) == ({}, set())
    vault.write("auth/token/revoke-accessor", {"accessor": victim_accessor})


def test_a_token_vault_will_not_look_up_stays_journaled(
    credentials: Credentials, store: Store, vault: Vault, settings: Settings
) -> None:
    """A refused lookup (Vault restarting, a token whose revocation is still queued, a
    worker without the right) proves nothing about whose a token is: its journal entry is
    neither revoked nor dropped, and the next teardown that can ask Vault revokes it."""
    task_id = str(uuid.uuid4())
    store.create(task_id, {"agent": "dba", "command": ["true"]})
    minted = vault.write("auth/token/create", {"meta": {"task_id": task_id}, "ttl": "10m"})
    accessor = minted["auth"]["accessor"]  # type: ignore[index]
    store.journal(task_id, token_accessor=accessor)
    blind = vault.write("auth/token/create", {"policies": ["default"], "ttl": "10m"})
    refused = copy.copy(credentials.broker)
    refused.vault = Vault(settings.vault_addr, blind["auth"]["client_token"])  # type: ignore[index]
    receipt = refused.revoke(task_id)
    assert receipt["verified"] is False and "ignored" not in receipt["token"], receipt
    assert "refused to look it up" in receipt["token"]["error"]
    assert store.journaled(task_id)[0]["token_accessor"] == accessor
    assert vault.write("auth/token/lookup-accessor", {"accessor": accessor})  # still alive
    receipt = credentials.revoke(task_id)
    assert receipt["token"]["verified"] is True and receipt["verified"] is True, receipt
    assert store.journaled(task_id) == ({}, set())
    with pytest.raises(VaultRefused):
        vault.write("auth/token/lookup-accessor", {"accessor": accessor})


def test_the_orchestrator_needs_only_its_documented_policy(
    settings: Settings, store: Store, runtime: DockerRuntime, vault: Vault
) -> None:
    """A worker whose Vault token holds only `airlock-orchestrator` runs a database task: it
    mints with the task's admission ticket, and without one it cannot."""
    created = vault.write(
        "auth/token/create",
        {"policies": ["airlock-orchestrator"], "no_default_policy": True, "ttl": "10m"},
    )
    token = created["auth"]["client_token"]  # type: ignore[index]
    narrow = replace(settings, vault_token=token)
    credentials = wiring.credentials(narrow, store)
    try:
        executor = Executor(narrow, store, runtime, credentials=credentials)
        unticketed, refusal, _ = run_task(executor, command=["sh", "-c", QUERY])
        state, status, logs = run_task(executor, True, command=["sh", "-c", QUERY])
    finally:
        credentials.endpoints.shutdown()
        vault.write("auth/token/revoke-accessor", {"accessor": created["auth"]["accessor"]})  # type: ignore[index]
    assert unticketed is S.FAILED and "permission denied" in refusal["reason"], refusal
    assert state is S.SUCCEEDED, (status["reason"], logs)
    assert logs == "checkout\n" and status["revocation"]["verified"] is True
    assert "minting" not in status["revocation"]  # the worker let its ticket login go itself


def test_verification_from_a_jwks_url(credentials: Credentials, grant: Grant) -> None:
    """A verifier outside Airlock needs only the JWKS URL."""
    server = JwksServer(credentials.jwks, "127.0.0.1", 0).start()
    try:
        remote = Verifier(
            lambda: fetch_jwks_url(server.url),
            "airlock-gateway",
            credentials.issuer,
            lambda t, j: True,
        )
        token = credentials.minter.mint("task-6", grant, grant.digest(), time.time() + 60)
        assert remote.verify(token.jwt)["jti"] == token.jti
    finally:
        server.stop()


def test_only_vault_not_knowing_a_token_verifies_its_revocation(
    settings: Settings, credentials: Credentials, vault: Vault
) -> None:
    """Verification asks Vault to look the token up: "invalid accessor" is the only yes.
    A lookup Vault refuses (here: a token without permission) verifies nothing."""
    created = vault.write("auth/token/create", {"policies": ["default"], "ttl": "5m"})
    accessor = created["auth"]["accessor"]  # type: ignore[index]
    blind = copy.copy(credentials.broker)
    blind.vault = Vault(settings.vault_addr, "hvs.not-a-token")
    try:
        refused = blind._revoke_token(accessor)
        assert refused["revoked"] is False and refused["verified"] is False
        assert vault.write("auth/token/lookup-accessor", {"accessor": accessor})
        revoked = credentials.broker._revoke_token(accessor)
        assert revoked["revoked"] is True and revoked["verified"] is True
        assert blind._revoke_token(accessor)["verified"] is False  # still only a refusal
    finally:
        vault.write("auth/token/revoke-accessor", {"accessor": accessor}, absent_ok=True)
