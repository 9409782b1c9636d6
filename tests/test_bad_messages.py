"""Queue messages of every wrong shape. Ones the front door signed (a malformed spec it let
through) are rejected with a reason; forged ones (unsigned, signed with another key, altered
after signing, replayed for another id or queue) are refused and logged with nothing
recorded or started; and the worker keeps serving."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from orchestrator.adapters.ticket import TicketSigner, generate
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.caller import Identities
from orchestrator.submission import local_operator
from orchestrator.worker import TASK_NAME
from tests.conftest import ROOT
from tests.test_spec import json_values

BAD = [
    ("spec is a string", {"spec": "rm -rf /"}, "spec: expected an object, got str"),
    ("spec is a list", {"spec": [1, 2, 3]}, "spec: expected an object, got list"),
    ("no spec", {}, "spec: expected an object, got NoneType"),
    (
        "unknown fields",
        {"spec": {"agent": "tester", "command": ["true"], "privileged": True}},
        "privileged: Extra inputs are not permitted",
    ),
    (
        "wrong types",
        {"spec": {"agent": 7, "command": [1], "timeout_s": "soon"}},
        "timeout_s: Input should be a valid integer",
    ),
    (
        "huge command",
        {"spec": {"agent": "tester", "command": ["x" * 200_000]}},
        "command.0: String should have at most 8192 characters",
    ),
    (
        "a spec claiming a user",
        {"spec": {"agent": "tester", "command": ["true"], "on_behalf_of": "alice"}},
        "on_behalf_of is not the user the ticket proves",
    ),
]


def signed(settings: Settings, task_id: str, spec: Any, queue: str | None = None) -> str:
    """A ticket from the front door's own key (as a front door that let a bad spec by would
    sign it): the operator submits, for nobody."""
    signer = TicketSigner(settings.ticket_key)
    return signer.sign(task_id, spec, queue or settings.queue, Identities(local_operator()))


def send_raw(
    client: Client, settings: Settings, kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """A message signed by the front door's key; the task's id and end."""
    task_id = str(uuid.uuid4())
    kwargs = {**kwargs, "ticket": signed(settings, task_id, kwargs.get("spec"))}
    client._celery.send_task(TASK_NAME, kwargs=kwargs, task_id=task_id, queue=settings.queue)
    for _ in range(600):
        if client.store.redis.exists(client.store.key(task_id)):
            return task_id, client.wait(task_id, timeout_s=60)
        time.sleep(0.05)
    pytest.fail(f"the worker recorded nothing for {kwargs!r:.200}")


@pytest.mark.parametrize(("name", "kwargs", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_messages_are_rejected_and_the_worker_keeps_serving(
    settings: Settings, worker: Any, runtime: Any, name: str, kwargs: dict[str, Any], reason: str
) -> None:
    client = Client(settings)
    task_id, status = send_raw(client, settings, kwargs)
    assert status["state"] == "rejected" and reason in status["reason"], status
    assert all(c.task_id != task_id for c in runtime.list_managed(settings.namespace))
    follow_up = client.submit({"agent": "tester", "command": ["true"]})
    assert client.wait(follow_up, timeout_s=60)["state"] == "succeeded"


# Messages a careless or hostile producer could send: specs built from the real field names
# with values of any JSON shape, and now and then fields the message must not have.
spec_fields = st.sampled_from(["agent", "command", "timeout_s", "limits", "env", "labels", "x"])
messages = st.fixed_dictionaries(
    {
        "spec": st.one_of(
            json_values,
            st.dictionaries(spec_fields, json_values, max_size=5).map(
                lambda d: {"agent": "tester", **d}
            ),
        )
    },
    optional={"traceparent": json_values},
)


@examples(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(messages)
def test_any_message_ends_with_a_reason_and_leaves_nothing(
    settings: Settings, worker: Any, runtime: Any, kwargs: dict[str, Any]
) -> None:
    task_id, status = send_raw(Client(settings), settings, kwargs)
    assert status["state"] in ("rejected", "failed", "succeeded", "timed_out"), status
    assert status["reason"], status
    assert all(c.task_id != task_id for c in runtime.list_managed(settings.namespace))


def worker_log(settings: Settings) -> str:
    return (ROOT / ".airlock" / "log" / f"worker-{settings.namespace}.log").read_text()


def refused(client: Client, settings: Settings, task_id: str, kwargs: dict[str, Any]) -> str:
    """Send a forged message; wait for the worker's log line refusing it; the line."""
    client._celery.send_task(TASK_NAME, kwargs=kwargs, task_id=task_id, queue=settings.queue)
    for _ in range(600):
        lines = [line for line in worker_log(settings).splitlines() if task_id in line]
        if lines:
            return lines[0]
        time.sleep(0.05)
    pytest.fail(f"the worker did not log a refusal of {task_id}")


def forgeries(settings: Settings, tmp: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, task id, message kwargs) for every way a message can pretend."""
    spec = {"agent": "tester", "command": ["true"]}
    generate(tmp / "other.key", tmp / "other.pub")
    stranger = TicketSigner(tmp / "other.key")
    ids = [str(uuid.uuid4()) for _ in range(7)]
    operator = Identities(local_operator())
    return [
        ("unsigned", ids[0], {"spec": spec}),
        ("empty ticket", ids[1], {"spec": spec, "ticket": ""}),
        (
            "signed with another key",
            ids[2],
            {"spec": spec, "ticket": stranger.sign(ids[2], spec, settings.queue, operator)},
        ),
        (
            "spec altered after signing",
            ids[3],
            {
                "spec": {**spec, "command": ["sh", "-c", "id"]},
                "ticket": signed(settings, ids[3], spec),
            },
        ),
        (
            "ticket of another task",
            ids[4],
            {"spec": spec, "ticket": signed(settings, ids[0], spec)},
        ),
        (
            "ticket for another queue",
            ids[5],
            {"spec": spec, "ticket": signed(settings, ids[5], spec, "elsewhere")},
        ),
        (
            "unexpected message fields",
            ids[6],
            {"spec": spec, "ticket": signed(settings, ids[6], spec), "privileged": True},
        ),
    ]


def test_forged_messages_are_refused_unrecorded_and_start_nothing(
    settings: Settings, worker: Any, runtime: Any, tmp_path: Any
) -> None:
    client = Client(settings)
    for what, task_id, kwargs in forgeries(settings, tmp_path):
        line = refused(client, settings, task_id, kwargs)
        assert "refused, nothing recorded or started" in line, (what, line)
        assert not client.store.redis.exists(client.store.key(task_id)), what
        assert all(c.task_id != task_id for c in runtime.list_managed(settings.namespace)), what
    follow_up = client.submit({"agent": "tester", "command": ["true"]})
    assert client.wait(follow_up, timeout_s=60)["state"] == "succeeded"
