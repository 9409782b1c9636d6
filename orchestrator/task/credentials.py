"""What a task is given, end to end: Vault credentials, its JWT, and its endpoint.

`Credentials.provision` mints through the broker and opens the task's endpoint, whose
handler hands the bootstrap over exactly once and unwraps only this task's own secrets.
`Credentials.revoke` undoes all of it and returns the receipt stored on the task.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.gateway.service import Gateway
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.broker import Broker, Provisioned
from orchestrator.adapters.vault.identity import Minter, Verifier, transit_jwks
from orchestrator.config import Settings, jwt_issuer
from orchestrator.core.grant import Grant
from orchestrator.core.lifecycle import TaskState
from orchestrator.errors import AirlockError

log = logging.getLogger(__name__)
LIVE_STATES = frozenset({TaskState.PROVISIONING.value, TaskState.RUNNING.value})


@dataclass
class Handout:
    """What the container needs to reach what it was given."""

    endpoint_dir: Path
    provisioned: Provisioned


class Credentials:
    """Mint, open, renew and revoke what a task is given. Built by `wiring.credentials`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        vault: Vault,
        minter: Minter,
        broker: Broker,
        audit: AuditLog,
        endpoints: Gateway,
    ) -> None:
        self.settings, self.store, self.vault = settings, store, vault
        self.minter, self.broker, self.audit = minter, broker, audit
        self.endpoints = endpoints
        self.issuer = jwt_issuer(settings)
        self.retry_delay_s = 0.5

    def provision(
        self,
        task_id: str,
        grant: Grant,
        grant_hash: str,
        deadline: float,
        context: dict[str, Any] | None = None,
        member: str | None = None,
        launch: dict[str, Any] | None = None,
        ticket: str | None = None,
    ) -> Handout:
        """Mint, journal and open. Raises ServiceUnavailable or VaultRefused.

        `context` (model, prompt hash, policy version, submitter) goes on every audit record
        and names the submitter in the task's JWT. With
        `member`, the endpoint of that warm runner is bound to the task and its runner is
        handed `launch` (its command and environment) once the credentials exist. The
        admission `ticket` is what Vault mints against (Broker.provision).
        """
        submitter = (context or {}).get("submitter") or None
        given = self.broker.provision(task_id, grant, grant_hash, deadline, submitter, ticket)
        if member is not None:
            directory = self.endpoints.claim(
                member, task_id, given, grant, context or {}, launch or {}
            )
            return Handout(directory, given)
        return Handout(self.endpoints.open(task_id, given, grant, context or {}), given)

    def renew(self, handout: Handout) -> None:
        self.broker.renew(handout.provisioned)

    def revoke(self, task_id: str, attempts: int = 3) -> dict[str, Any]:
        """Revoke and verify everything the task was given; the receipt. Never raises.

        Retries a few times (a Vault restart takes seconds); what is still unconfirmed
        after that stays journaled for the reaper.
        """
        receipt: dict[str, Any] = {"verified": False}
        ignored: list[dict[str, Any]] = []
        for attempt in range(attempts):
            try:
                receipt = self.broker.revoke(task_id)
            except AirlockError as exc:
                receipt = {"verified": False, "error": str(exc)}
            # Planted journal entries are dropped on first sight; the receipt keeps them.
            ignored += receipt.pop("ignored", [])
            token = receipt.get("token") or {}
            if ignored or token.get("ignored"):
                receipt["ignored"] = ignored
                receipt["verified"] = False
                break  # a tampered journal: no retry makes it clean
            if receipt["verified"]:
                break
            log.warning(
                "task %s: revocation not confirmed (attempt %d): %s",
                task_id,
                attempt + 1,
                receipt.get("error", "see receipt"),
            )
            time.sleep(self.retry_delay_s * (attempt + 1))
        receipt["endpoint_removed"] = self.endpoints.close(task_id)
        return receipt

    def jwks(self) -> dict[str, Any]:
        return transit_jwks(self.vault)

    def verifier(self) -> Verifier:
        return task_verifier(self.settings, self.vault, self.store)


def is_live(store: Store, task_id: str, jti: str) -> bool:
    """A task JWT is honoured only while its task is provisioning or running."""
    try:
        record = store.get(task_id)
    except AirlockError:
        return False
    return record.get("state") in LIVE_STATES and record.get("jwt_jti") == jti


def task_verifier(settings: Settings, vault: Vault, store: Store) -> Verifier:
    """What the gateway checks a task's JWT with: the transit key's JWKS, this deployment's
    audience and issuer, and the task still being live."""
    return Verifier(
        lambda: transit_jwks(vault),
        settings.jwt_audience,
        jwt_issuer(settings),
        lambda task_id, jti: is_live(store, task_id, jti),
    )
