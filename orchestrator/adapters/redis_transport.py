"""The Celery broker transport for Redis URLs: kombu's, with one Redis client per channel.

kombu's Redis channel builds a new `redis.Redis` for every command it sends outside its
event loop. With late acknowledgement (a task is acked only once it has ended) that is one
client per task, and building one costs more than the acknowledgement itself. A client
over the channel's connection pool is safe to share between threads, so the channel here
builds it once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    @cached_property
    def _shared_client(self) -> Any:
        return self._create_client()  # type: ignore[no-untyped-call]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        yield client or self._shared_client


class Transport(kombu_redis.Transport):
    Channel = Channel
