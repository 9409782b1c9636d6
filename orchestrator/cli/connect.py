"""Which client the CLI speaks through: the HTTP API when AIRLOCK_API_URL is set (with the
token of `airlock login` or AIRLOCK_TOKEN), else direct access to the store and the queue,
the operator's mode on a worker host (it needs Redis and the ticket key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator import config

if TYPE_CHECKING:
    from orchestrator.client import Client
    from orchestrator.remote import RemoteClient


def connect() -> Client | RemoteClient:
    settings = config.load()
    # Lazy on purpose: the API client loads no Redis, the direct one no HTTP client.
    if settings.api_url:
        from orchestrator.remote import RemoteClient

        return RemoteClient(settings.api_url)
    from orchestrator.client import Client

    return Client(settings)
