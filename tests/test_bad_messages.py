"""Raw Celery messages of every wrong shape: refused with a reason, and the worker keeps serving."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.worker import TASK_NAME
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
        "unexpected message fields",
        {"spec": {"agent": "tester", "command": ["true"]}, "privileged": True},
        "message: Extra inputs are not permitted",
    ),
]


def send_raw(
    client: Client, settings: Settings, kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """A raw Celery message, as any producer could send it; the task's id and end."""
    task_id = str(uuid.uuid4())
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
    optional={"traceparent": json_values, "extra": json_values},
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
