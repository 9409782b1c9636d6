"""`airlock serve`: the API built from the settings, served by uvicorn."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from orchestrator import wiring
from orchestrator.adapters.oidc import OidcVerifier
from orchestrator.adapters.vault.identity import transit_jwks
from orchestrator.api.app import Served, create_app
from orchestrator.api.console import Console
from orchestrator.api.frontdoor import FrontDoor
from orchestrator.client import Client
from orchestrator.config import Settings, callers_file
from orchestrator.errors import ConfigError
from orchestrator.policy.bundle import Deployment
from orchestrator.policy.engine import PolicyEngine
from orchestrator.submission import Submitter

JWKS_CACHE_S = 60.0
POLICY_RECHECK_S = 1.0  # an edited callers policy is in force within a second


def build(settings: Settings) -> FastAPI:
    """The API with its real parts. Raises ConfigError for a missing issuer or ticket key."""
    if not settings.oidc_issuer:
        raise ConfigError("AIRLOCK_OIDC_ISSUER is not set: the API verifies callers against it")
    store = wiring.store(settings)
    verifier = OidcVerifier(settings.oidc_issuer, settings.oidc_audience)
    # The callers policy needs no facts about worker hosts.
    policy = PolicyEngine(
        settings.policy_dir,
        settings.agents_dir,
        lambda: Deployment.of(settings, ()),
        callers_file(settings),
        recheck_s=POLICY_RECHECK_S,
    )
    policy.bundle()  # a broken bundle is found at start, not at the first submit
    front = FrontDoor(settings, store, verifier, policy, Submitter(settings, store))
    client = Client(settings, store)
    console = Console(front, client, wiring.audit_log(settings, store))
    return create_app(front, client, _jwks(settings), console)


def _jwks(settings: Settings) -> Any:
    vault = wiring.vault(settings)
    cached: list[Any] = [None, 0.0]
    lock = threading.Lock()

    def jwks() -> dict[str, Any]:
        with lock:
            if cached[0] is None or time.monotonic() - cached[1] > JWKS_CACHE_S:
                cached[0], cached[1] = transit_jwks(vault), time.monotonic()
            return dict(cached[0])

    return jwks


def serve(settings: Settings, listen: str, log_level: str = "warning") -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"listen address {listen!r}: expected HOST:PORT")
    uvicorn.run(
        Served(build(settings)),
        host=host.strip("[]"),
        port=int(port),
        log_level=log_level.lower(),
        access_log=False,
        loop="uvloop",
        http="httptools",
        # Nothing here reads the client's address: no X-Forwarded-* rewriting per request.
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
