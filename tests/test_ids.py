"""Ids are ids: whatever a producer, a Redis writer or a caller offers as a task id, only a
task id (or a warm runner's key) is ever made an endpoint path, and nothing outside the
endpoint root is created, mounted or removed. Tried as an attacker would: path tricks, NUL,
huge strings, through the endpoint server, the credential journal and the queue."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from orchestrator.adapters.gateway.endpoint import EndpointServer
from orchestrator.adapters.gateway.service import RemoteGateway
from orchestrator.adapters.queue import TASK_NAME
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.ids import endpoint_key, is_endpoint_key, is_task_id
from orchestrator.errors import InvalidId
from orchestrator.task.credentials import Credentials
from orchestrator.task.reaper import reap_credentials, reap_endpoints

HOSTILE = [
    "",
    ".",
    "..",
    "/etc",
    "a/../../b",
    "../" * 20 + "etc",
    "x\x00y",
    "x" * 10_000,
    "pool-../../etc",
    "pool-" + "0" * 15 + "/",
    str(uuid.uuid4()).upper(),
    str(uuid.uuid4()) + "/..",
    " " + str(uuid.uuid4()),
    str(uuid.uuid4()) + "\n",
]


def test_only_ids_are_ids() -> None:
    assert is_task_id(str(uuid.uuid4())) and is_endpoint_key("pool-0123456789abcdef")
    for value in HOSTILE:
        assert not is_endpoint_key(value), value
        with pytest.raises(InvalidId):
            endpoint_key(value)


@pytest.fixture
def endpoints(tmp_path: Path) -> Any:
    server = EndpointServer(tmp_path / "root")
    yield server
    server.shutdown()


@examples(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=300), st.uuids().map(str)))
def test_no_name_leaves_the_endpoint_root(tmp_path_factory: Any, value: str) -> None:
    root = tmp_path_factory.getbasetemp() / "endpoint-root"
    server = EndpointServer(root)
    try:
        try:
            directory = server.directory(value)
        except InvalidId:
            assert not is_endpoint_key(value)
            return
        assert directory.parent == root and directory.name == value
    finally:
        server.shutdown()


def victim(tmp_path: Path) -> Path:
    """A directory that must survive: files a root process could be tricked into removing."""
    target = tmp_path / "victim"
    (target / "sub").mkdir(parents=True)
    (target / "precious").write_text("keep me")
    (target / "sub" / "also").write_text("keep me too")
    return target


def intact(target: Path) -> bool:
    return (target / "precious").read_text() == "keep me" and (target / "sub" / "also").is_file()


def test_closing_a_hostile_name_touches_nothing(endpoints: EndpointServer, tmp_path: Path) -> None:
    target = victim(tmp_path)
    relative = "../" * 10 + str(target).lstrip("/")
    for value in [str(target), relative, ".", "..", *HOSTILE]:
        assert endpoints.close(value) is False
    assert intact(target) and endpoints.root.parent.exists()


def test_a_remote_gateway_close_touches_nothing(settings: Settings, tmp_path: Path) -> None:
    target = victim(tmp_path)
    gateway = RemoteGateway(settings)  # no gateway listens: it would clean up itself
    for value in [str(target), "../" * 10 + str(target).lstrip("/"), ".", ".."]:
        assert gateway.close(value) is False
    assert intact(target)


def test_a_redis_writer_cannot_make_gc_remove_a_directory(
    settings: Settings, credentials: Credentials, tmp_path: Path
) -> None:
    """`SADD NS:credentials /some/dir` used to make the next `airlock gc` (root) delete it."""
    store = credentials.store
    target = victim(tmp_path)
    planted = [str(target), "../" * 10 + str(target).lstrip("/"), ".", ".."]
    for value in planted:
        store.redis.sadd(store.keys.journal_index, value)
        store.redis.hset(store.keys.journal(value), "token_accessor", "planted")
    found = reap_credentials(store, credentials) + reap_endpoints(store, credentials)
    assert intact(target)
    journal = [item for item in found if item.kind == "journal"]
    assert {item.task_id for item in journal} == {v[:80] for v in planted}
    assert all(item.why == "not a task id" for item in journal)
    assert not set(planted) & store.journaled_tasks()  # dropped, never acted on


def test_hostile_message_ids_are_refused_unrecorded(
    settings: Settings, worker: Any, runtime: Any
) -> None:
    """A producer choosing the message id: nothing is recorded, started or mounted for it,
    and the worker keeps serving."""
    client = Client(settings)
    before = set(settings.endpoint_dir.rglob("*"))
    hostile = [".", "..", "/etc", "a/../../b", "x" * 10_000, str(uuid.uuid4()).upper()]
    spec = {"agent": "tester", "command": ["true"]}
    for value in hostile:
        client._celery.send_task(
            TASK_NAME, kwargs={"spec": spec}, task_id=value, queue=settings.queue
        )
    follow_up = client.submit(spec)  # queued behind them: they were all taken first
    assert client.wait(follow_up, timeout_s=60)["state"] == "succeeded"
    for value in hostile:
        assert not client.store.redis.exists(client.store.key(value)), value[:40]
    assert runtime.list_managed(settings.namespace) == []
    created = set(settings.endpoint_dir.rglob("*")) - before
    root = settings.endpoint_dir / settings.namespace
    assert all(p == root or p.is_relative_to(root) for p in created), created
