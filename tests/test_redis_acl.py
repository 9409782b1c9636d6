"""Least privilege in Redis: each component as its own Redis user, refused outside its
rights, and a real task run end to end with the worker and the front door on theirs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from orchestrator.adapters import redis_acl
from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.store import Store
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.submission import Submitter
from tests.conftest import IN_CI, running


def url_for(settings: Settings, user: str, password: str) -> str:
    parts = urlsplit(settings.redis_url)
    return f"redis://{user}:{password}@{parts.hostname}:{parts.port or 6379}/0"


@pytest.fixture(scope="module")
def acl(settings: Settings) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Users of every component for a namespace and queue of their own."""
    ns = f"{settings.namespace}-acl"
    scoped = replace(settings, namespace=ns, queue=ns)
    admin = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    passwords = {c: secrets.token_urlsafe(24) for c in redis_acl.COMPONENTS}
    made = redis_acl.apply(admin, passwords, ns, [ns, f"{ns}-gvisor"], prefix=ns)
    urls = {c: url_for(settings, redis_acl.user_name(c, ns), p) for c, p in passwords.items()}
    try:
        yield scoped, urls
    finally:
        admin.execute_command("ACL", "DELUSER", *made)
        for key in admin.scan_iter(f"{ns}*"):
            admin.delete(key)


def as_user(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def refused(call: Any) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_password_less_access_is_off(settings: Settings) -> None:
    parts = urlsplit(settings.redis_url)
    if not parts.username:
        message = "REDIS_URL names no user: run scripts/bootstrap (it sets up the users)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    anonymous = redis.Redis(host=parts.hostname or "", port=parts.port or 6379)
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        anonymous.ping()


def test_each_component_is_refused_outside_its_rights(acl: tuple[Settings, dict[str, str]]) -> None:
    scoped, urls = acl
    ns = scoped.namespace
    worker, gateway, api, ops = (as_user(urls[c]) for c in ("worker", "gateway", "api", "ops"))
    for user in (worker, gateway, api, ops):
        assert refused(user.flushall)
        assert refused(lambda u=user: u.config_get("*"))
        assert refused(lambda u=user: u.keys("*"))
        assert refused(lambda u=user: u.execute_command("ACL", "LIST"))
        assert refused(lambda u=user: u.get("some-other-deployment:task:x"))
    # The worker never reads the front door's idempotency keys.
    assert refused(lambda: worker.hgetall(f"{ns}:idem:abc"))
    # The front door never touches the credential journal.
    assert refused(lambda: api.hgetall(f"{ns}:cred:abc"))
    assert refused(lambda: api.xadd(f"{ns}:audit", {"record": "{}"}))  # it only reads it
    assert refused(lambda: api.hset(f"{ns}:pool", "x", "{}"))  # the pool: read only
    # The gateway reads task records, and writes only the audit, counts and alarms.
    assert gateway.hgetall(f"{ns}:task:abc") == {}
    assert refused(lambda: gateway.hset(f"{ns}:task:abc", "state", "succeeded"))
    assert refused(lambda: gateway.sadd(f"{ns}:credentials", "/some/dir"))
    gateway.hincrby(f"{ns}:task:abc:egress", "deny", 1)
    # Ops read, and write nothing.
    assert ops.hgetall(f"{ns}:task:abc:egress") == {"deny": "1"}
    assert refused(lambda: ops.set(f"{ns}:task:abc", "x"))
    assert refused(lambda: ops.delete(f"{ns}:audit"))


def test_a_task_runs_end_to_end_with_each_part_on_its_own_user(
    acl: tuple[Settings, dict[str, str]], settings: Settings, vault: Any
) -> None:
    """The worker (with its gateway) as `worker`, the submitting side as `api`; the whole
    life of a task, its audit and its revocation work within those rights."""
    scoped, urls = acl
    as_api = replace(scoped, redis_url=urls["api"])
    with running(
        scoped,
        "worker",
        "--concurrency",
        "2",
        log=f"worker-{scoped.namespace}",
        REDIS_URL=urls["worker"],
    ):
        store = Store(as_api.redis_url, as_api.namespace)
        task_id = Submitter(as_api, store).submit(
            {"agent": "tester", "command": ["sh", "-c", "echo acl; exit 3"]}
        )
        done = Client(scoped, Store(settings.redis_url, scoped.namespace)).wait(task_id, 120)
    assert done["state"] == "failed" and done["exit_code"] == 3, done
    assert done["revocation"]["verified"], done["revocation"]
    ops = Store(urls["ops"], scoped.namespace)
    assert ops.get(task_id)["state"] == "failed"
    assert AuditLog(ops).verify()[1] == []
