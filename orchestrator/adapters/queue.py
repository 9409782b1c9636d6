"""The task queue: a Celery app configured for Airlock's delivery rules, and the message
contract producers in any language follow (Celery protocol 2, JSON):

    task name  "airlock.run"
    task id    the Airlock task id (a UUID, canonical lower-case form; anything else is
               refused unrecorded)
    kwargs     {"spec": {...}, "ticket": "...", "traceparent": "..."}: the task spec as in
               `airlock spec schema`, and the front door's admission ticket for it
               (`adapters.ticket`); a message without a valid ticket is refused
    headers    `traceparent` (W3C trace context), as instrumented Celery producers send it;
               the kwargs' copy is read when the header is absent
    queue      the spec's `queue`, or the deployment's default queue ("airlock")

Only the front door (`airlock serve`, or an operator holding the ticket key) can produce a
message a worker accepts; other systems submit through the HTTP API. The worker registers
what runs the tasks (`orchestrator.worker`); a producer only sends.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from orchestrator.config import Settings
from orchestrator.errors import ServiceUnavailable

TASK_NAME = "airlock.run"
TASK_EXCHANGE = "airlock.tasks"
REAP_TASK_NAME = "airlock.reap"


def celery_app(settings: Settings) -> Celery:
    """The Celery app of this deployment, with no tasks registered."""
    broker = settings.broker_url or settings.redis_url
    app = Celery("airlock", broker=broker, set_as_current=False)
    app.conf.update(
        # Plain redis:// URLs get kombu's Redis transport with a shared client.
        broker_transport=(
            "orchestrator.adapters.redis_transport:Transport"
            if broker.startswith("redis://")
            else None
        ),
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A task is acknowledged only once it has ended, and given back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # AMQP: publishes are confirmed by the broker (a publish it refuses is an error here,
        # never a message lost without a word).
        broker_transport_options={
            "visibility_timeout": settings.max_timeout_s + 600,
            **({"confirm_publish": True} if broker.startswith(("amqp://", "amqps://")) else {}),
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_create_missing_queues=True,
        beat_schedule={
            "airlock-reap": {"task": REAP_TASK_NAME, "schedule": settings.reap_period_s},
        },
    )
    return app


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def redis_message(
    task_id: str, spec: dict[str, Any], traceparent: str | None, queue: str, ticket: str
) -> str:
    """The message for one task as a Redis broker holds it (kombu's envelope around a Celery
    protocol 2 message, body base64), built in one step: what `enqueue` sends through
    Celery, ready to be pushed onto the queue's list (Keys.queue) in the same Redis call that
    records the task. Producers in other languages build the same."""
    body = [
        [],
        {"spec": spec, "traceparent": traceparent, "ticket": ticket},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        # W3C trace context where instrumented consumers look for it (and in kwargs, where
        # Airlock's workers before it did).
        **({"traceparent": traceparent} if traceparent else {}),
    }
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return json.dumps(
        {
            "body": base64.b64encode(encoded).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        },
        separators=(",", ":"),
    )


def enqueue(
    app: Celery,
    task_id: str,
    spec: dict[str, Any],
    traceparent: str | None,
    queue: str,
    ticket: str,
) -> None:
    """Send one task. Raises ServiceUnavailable when the broker did not take it.

    To an AMQP broker every queue is bound to one exchange, TASK_EXCHANGE: a producer needs
    read rights on that exchange alone to declare and bind, never on a queue, so the front
    door's broker user can publish but not take a task (see scripts/bootstrap's RabbitMQ
    users). Workers consume the queues by name as before.
    """
    destination: str | Queue = queue
    if str(app.conf.broker_url or "").startswith(("amqp://", "amqps://")):
        exchange = Exchange(TASK_EXCHANGE, "direct", durable=True)  # type: ignore[no-untyped-call]
        destination = Queue(queue, exchange, routing_key=queue)  # type: ignore[no-untyped-call]
    try:
        app.send_task(
            TASK_NAME,
            kwargs={"spec": spec, "traceparent": traceparent, "ticket": ticket},
            task_id=task_id,
            queue=destination,
            headers={"traceparent": traceparent} if traceparent else None,
            # No repr of the spec in the message headers (Celery adds one for display):
            # the spec is in the body already, and its env has no business in broker tools.
            argsrepr="",
            kwargsrepr="",
        )
    except Exception as exc:  # kombu raises many kinds; all mean "not enqueued"
        raise ServiceUnavailable("broker", str(exc)) from exc
