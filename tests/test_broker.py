"""The Redis broker transport: kombu's, with one client per channel for acknowledgements."""

from __future__ import annotations

import base64
import json
import uuid

from orchestrator.adapters import redis_transport as broker
from orchestrator.adapters.queue import celery_app, enqueue, redis_message
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.worker import create_app


def test_redis_urls_get_the_shared_client_transport(settings: Settings) -> None:
    app = create_app(settings)
    with app.connection_for_write() as conn:
        assert conn.transport_cls == "orchestrator.adapters.redis_transport:Transport"
        assert isinstance(conn.default_channel, broker.Channel)
        queue = conn.SimpleQueue(f"{settings.namespace}-broker-test")
        channel = queue.channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        try:
            for n in range(3):
                queue.put({"n": n})
            for n in range(3):
                message = queue.get(timeout=5)
                assert message.payload == {"n": n}
                held = channel.client.hexists(channel.unacked_key, message.delivery_tag)
                message.ack()
                # Held for redelivery until acknowledged, then let go.
                assert held and not channel.client.hexists(
                    channel.unacked_key, message.delivery_tag
                )
        finally:
            queue.clear()
            queue.close()


def test_a_message_built_in_one_step_is_the_one_celery_sends(settings: Settings) -> None:
    """The submit path pushes its message with the record (queue.redis_message); what it
    builds must be what Celery's own send_task pushes, but for per-send ids."""
    queue = f"{settings.namespace}-message-test"
    task_id = str(uuid.uuid4())
    spec = {"agent": "tester", "command": ["true"], "env": {"A": "é"}}
    client = Client(settings).store.redis
    try:
        enqueue(
            celery_app(settings),
            task_id,
            spec,
            "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            queue,
            "T",
        )
        sent = json.loads(client.rpop(queue))
    finally:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    ours = json.loads(
        redis_message(task_id, spec, "00-" + "1" * 32 + "-" + "2" * 16 + "-01", queue, "T")
    )
    for message in (sent, ours):
        message["body"] = json.loads(base64.b64decode(message["body"]))
        message["properties"].pop("delivery_tag")
        message["properties"].pop("reply_to")  # Celery's per-app reply queue; no result is kept
        message["headers"].pop("origin")
        for repr_field in ("argsrepr", "kwargsrepr"):
            message["properties"].pop(repr_field, None)
    assert ours == sent


def test_other_brokers_keep_their_transport(settings: Settings) -> None:
    from dataclasses import replace

    app = create_app(replace(settings, broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    assert app.conf.broker_transport is None


def test_rabbitmq_users_the_front_door_publishes_and_only_the_worker_consumes(
    settings: Settings,
) -> None:
    """On Airlock's vhost the front door's user may publish but never take a message (a
    stolen API credential cannot drain or read the queue); the worker's user runs the task."""
    import os
    import time
    import uuid
    from dataclasses import replace

    import kombu
    import pytest

    from orchestrator.adapters.queue import TASK_EXCHANGE
    from orchestrator.client import Client
    from orchestrator.submission import Submitter
    from tests.conftest import IN_CI, running

    api_url = os.environ.get("AIRLOCK_RABBITMQ_URL_API")
    worker_url = os.environ.get("AIRLOCK_RABBITMQ_URL_WORKER")
    if not api_url or not worker_url:
        message = "AIRLOCK_RABBITMQ_URL_API/_WORKER not set (run scripts/bootstrap)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    queue = f"{settings.namespace}-mq-{uuid.uuid4().hex[:6]}"
    declared = kombu.Queue(queue, kombu.Exchange(TASK_EXCHANGE, "direct"), routing_key=queue)
    with kombu.Connection(api_url) as conn:  # declares, binds and publishes as enqueue does
        kombu.Producer(conn.default_channel).publish(
            {"probe": 1}, exchange=declared.exchange, routing_key=queue, declare=[declared]
        )
        with pytest.raises(Exception, match="ACCESS_REFUSED"):
            kombu.Queue(queue, channel=conn.default_channel, no_declare=True).get()
    with kombu.Connection(worker_url) as conn:
        bound = declared.bind(conn.default_channel)
        message = bound.get(no_ack=True)
        assert message is not None and message.payload == {"probe": 1}
        bound.delete()

    scoped = replace(settings, queue=queue, broker_url=api_url)
    with running(
        scoped,
        "worker",
        "--concurrency",
        "1",
        log=f"worker-{queue}",
        AIRLOCK_BROKER_URL=worker_url,
    ):
        with kombu.Connection(worker_url) as conn:  # the worker has declared its queue
            for _ in range(300):
                try:
                    conn.default_channel.queue_declare(queue, passive=True)
                    break
                except Exception:
                    conn.close()
                    conn.connect()
                    time.sleep(0.1)
        task_id = Submitter(scoped, Client(scoped).store).submit(
            {"agent": "tester", "command": ["true"]}
        )
        assert Client(scoped).wait(task_id, 120)["state"] == "succeeded"
