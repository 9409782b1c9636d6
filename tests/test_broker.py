"""The Redis broker transport: kombu's, with one client per channel for acknowledgements."""

from __future__ import annotations

from orchestrator.adapters import redis_transport as broker
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


def test_other_brokers_keep_their_transport(settings: Settings) -> None:
    from dataclasses import replace

    app = create_app(replace(settings, broker_url="amqp://guest:guest@127.0.0.1:5672//"))
    assert app.conf.broker_transport is None
