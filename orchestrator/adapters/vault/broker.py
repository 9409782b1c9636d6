"""The per-task credential broker: mint at provision, hand over wrapped, revoke and verify.

Order matters. The task token's accessor is journaled in Redis before anything derived from
the token exists; each lease id is journaled before its secret is wrapped for the task.
Every lease hangs off the task token, whose explicit max TTL is the task's deadline plus a
grace: if every Airlock process died, all of it would still expire (a task that reads
nothing from Vault is given no token). Teardown
revokes leases (synchronously), then the token by accessor, then checks with Vault that
neither exists any more, and returns a receipt saying so. What could not be verified stays
in the journal for the reaper to retry, even across a worker crash.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.identity import Minter, TaskToken
from orchestrator.adapters.vault.setup import TICKET_AUTH, entity_alias, token_role
from orchestrator.config import Settings
from orchestrator.core.grant import Grant, SecretGrant
from orchestrator.errors import AirlockError, VaultRefused

log = logging.getLogger(__name__)
WRAP_TTL_S = 120
WRAPPING = "wrapping:"  # journal entries for wrapping tokens, by accessor
MINTING = "minting:"  # journal entries for the ticket login that minted, by accessor


class Undecided(Exception):
    """Vault would not say whose a journaled token is: it is neither revoked nor dropped."""


@dataclass(frozen=True)
class WrappedSecret:
    name: str
    kind: str
    token: str
    creation_path: str

    def bootstrap(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "wrap_token": self.token,
            "creation_path": self.creation_path,
        }


@dataclass
class Provisioned:
    """What a task was given. The Vault token stays in the worker's memory, never elsewhere."""

    token: str = field(repr=False)
    accessor: str
    secrets: list[WrappedSecret]
    jwt: TaskToken
    # Credentials only the gateway holds (injected into requests), by placeholder name.
    injected: dict[str, str] = field(default_factory=dict, repr=False)


def secret_path(secret: SecretGrant) -> str:
    if secret.kind == "database":
        return f"database/creds/{secret.role}"
    return str(secret.path)


class Broker:
    def __init__(
        self,
        vault: Vault,
        store: Store,
        settings: Settings,
        minter: Minter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vault = vault
        self.store = store
        self.settings = settings
        self.minter = minter
        self.clock = clock

    # -- provision -------------------------------------------------------------------------
    def provision(
        self,
        task_id: str,
        grant: Grant,
        grant_hash: str,
        deadline: float,
        submitter: str | None = None,
        ticket: str | None = None,
    ) -> Provisioned:
        """Mint the task's Vault token, its wrapped secrets and its JWT. A grant that reads
        nothing from Vault (no secrets, no injected credentials) gets no Vault token at all:
        nothing would use it, and a credential nothing uses is one too many.

        Minting and signing happen with the token a login with the task's admission `ticket`
        gives (the front door's proof that it admitted this task, for this agent): the
        worker's own policy holds neither right. Without a ticket (the operator's direct
        calls), this client's own token is used, and works only where its policy allows.

        Raises ServiceUnavailable or VaultRefused; what was minted before is journaled.
        """
        if not ticket:
            return self._provision(task_id, grant, grant_hash, deadline, submitter, None)
        minting, entry = self._log_in_with(task_id, ticket, grant.agent)
        try:
            return self._provision(task_id, grant, grant_hash, deadline, submitter, minting)
        finally:
            self._let_go(task_id, minting, entry)

    def _log_in_with(self, task_id: str, ticket: str, agent: str) -> tuple[str, str]:
        """A token of minutes that may mint for `agent` only, from its admission ticket,
        and its journal entry: a login the worker could not revoke itself (Vault went away,
        the worker died) is the task's teardown's, or the reaper's, like any credential."""
        answer = self.vault.write(f"auth/{TICKET_AUTH}/login", {"role": agent, "jwt": ticket})
        auth = (answer or {}).get("auth") or {}
        token, entry = str(auth["client_token"]), MINTING + str(auth.get("accessor", ""))
        try:
            self.store.journal_lease(task_id, entry)
        except AirlockError:  # not journaled: let it go now, or it outlives the task
            self._let_go(task_id, token, None)
            raise
        return token, entry

    def _let_go(self, task_id: str, minting: str, entry: str | None) -> None:
        try:
            self.vault.write("auth/token/revoke-self", token=minting, ride_out_s=0)
            if entry:
                self.store.forget_credentials(task_id, {entry})
        except AirlockError as exc:  # journaled: teardown or the reaper revokes it
            log.info("minting token not revoked now (left to teardown): %s", exc)

    def _provision(
        self,
        task_id: str,
        grant: Grant,
        grant_hash: str,
        deadline: float,
        submitter: str | None,
        minting: str | None,
    ) -> Provisioned:
        token = accessor = ""
        if grant.reads_vault():
            token, accessor = self._task_token(task_id, grant, deadline, minting)
        # The JWT's id is chosen now and journaled with the token, before either is used.
        jti = str(uuid.uuid4())
        minted: dict[str, Any] = {"token_accessor": accessor} if accessor else {}
        self.store.journal(
            task_id, on_task={"jwt_jti": jti}, created_at=self.clock(), jti=jti, **minted
        )
        wrapped = [self._wrapped(task_id, token, secret) for secret in grant.secrets]
        jwt = self.minter.mint(task_id, grant, grant_hash, deadline, jti, submitter, token=minting)
        injected = {
            inj.name: (
                self._read_field(task_id, token, inj.path, inj.field)
                if inj.path
                else self.minter.mint(
                    task_id, grant, grant_hash, deadline, None, submitter, inj.audience, minting
                ).jwt
            )
            for inj in grant.injections()
        }
        return Provisioned(token, accessor, wrapped, jwt, injected)

    def _task_token(
        self, task_id: str, grant: Grant, deadline: float, minting: str | None
    ) -> tuple[str, str]:
        """The task's Vault token (its secrets' leases hang off it) and its accessor."""
        ttl = math.ceil(deadline - self.clock()) + self.settings.credential_grace_s
        created = (
            self.vault.write(
                f"auth/token/create/{token_role(grant.agent)}",
                {
                    "meta": {
                        "task_id": task_id,
                        "agent": grant.agent,
                        "on_behalf_of": grant.on_behalf_of or "",
                    },
                    "explicit_max_ttl": f"{ttl}s",
                    "entity_alias": entity_alias(grant.agent),
                    "display_name": f"task-{task_id}",
                    "renewable": True,
                },
                token=minting,
            )
            or {}
        )
        auth = created.get("auth") or {}
        return str(auth.get("client_token")), str(auth.get("accessor"))

    def _read(self, task_id: str, token: str, path: str) -> dict[str, Any]:
        """Read a secret with the task token; its lease is journaled before anything else."""
        answer = self.vault.read(path, token=token) or {}
        if answer.get("lease_id"):
            self.store.journal_lease(task_id, str(answer["lease_id"]))
        data = answer.get("data") or {}
        if isinstance(data.get("data"), dict) and "metadata" in data:  # KV version 2
            data = data["data"]
        return dict(data)

    def _read_field(self, task_id: str, token: str, path: str, name: str) -> str:
        value = self._read(task_id, token, path).get(name)
        if not isinstance(value, str) or not value:
            raise VaultRefused(f"GET {path}: no field {name!r} to inject")
        return value

    def _wrapped(self, task_id: str, token: str, secret: SecretGrant) -> WrappedSecret:
        """Read the secret with the task token, journal its lease, and wrap it for the runner.

        The read is not wrapped by Vault itself: a lease created inside a wrapped response
        is not revoked with the token that asked for it, and its id could not be journaled.
        Read plainly, the lease hangs off the task token and dies with it.
        """
        path = secret_path(secret)
        data = self._read(task_id, token, path)
        wrapped = (
            self.vault.write(
                "sys/wrapping/wrap",
                {"secret": data, "source": path},
                token=token,
                wrap_ttl=f"{WRAP_TTL_S}s",
            )
            or {}
        )
        info = wrapped.get("wrap_info") or {}
        if not info.get("token"):
            raise VaultRefused("sys/wrapping/wrap: Vault did not wrap the secret")
        # A task that never unwraps (it died first) must not leave the wrapped copy behind.
        self.store.journal_lease(task_id, WRAPPING + str(info.get("accessor", "")))
        return WrappedSecret(
            secret.name, secret.kind, str(info["token"]), str(info.get("creation_path"))
        )

    def renew(self, provisioned: Provisioned) -> None:
        """Extend the periodic task token by one period (never past its explicit max TTL)."""
        if not provisioned.token:
            return  # the task reads nothing from Vault and was given no token
        self.vault.write(
            "auth/token/renew-self",
            {"increment": f"{self.settings.vault_token_period_s}s"},
            token=provisioned.token,
        )

    # -- what the runner asks for through its endpoint ----------------------------------------
    def lookup_wrapping(self, wrap_token: str) -> dict[str, Any]:
        answer = self.vault.write("sys/wrapping/lookup", {"token": wrap_token}) or {}
        return dict(answer.get("data") or {})

    def unwrap(self, wrap_token: str) -> dict[str, Any]:
        """Unwrap one of the task's secrets (its lease was journaled when it was read)."""
        answer = self.vault.write("sys/wrapping/unwrap", {}, token=wrap_token) or {}
        data = answer.get("data") or {}
        return {"data": data.get("secret") or {}, "source": data.get("source")}

    # -- teardown --------------------------------------------------------------------------
    def revoke(self, task_id: str) -> dict[str, Any]:
        """Revoke everything journaled for the task and verify it; returns the receipt.

        Its calls do not ride out a Vault restart one by one: the caller tries the whole
        revocation again a few times, and what stays unverified is the reaper's.
        """
        fields, leases = self.store.journaled(task_id)
        receipt: dict[str, Any] = {"at": self.clock(), "leases": [], "token": None}
        done, foreign = set(), set()
        roles = self._database_roles(task_id)
        for lease in sorted(leases):
            try:
                why = self._not_ours(task_id, lease, roles)
            except Undecided as exc:  # kept journaled: the next try, or the reaper, asks again
                receipt.setdefault("undecided", []).append({"id": lease[:120], "why": str(exc)})
                continue
            if why is not None:  # a planted entry: never revoked, dropped, and alarmed
                foreign.add(lease)
                self._alarm(task_id, f"journal entry {lease[:120]!r} ignored: {why}")
                receipt.setdefault("ignored", []).append({"id": lease[:120], "why": why})
                continue
            if lease.startswith(WRAPPING):  # unwrapped already, or cut now
                entry = self._revoke_token(lease.removeprefix(WRAPPING))
                receipt.setdefault("wrapped", []).append(entry)
            elif lease.startswith(MINTING):
                entry = self._revoke_token(lease.removeprefix(MINTING))
                receipt.setdefault("minting", []).append(entry)
            else:
                entry = self._revoke_lease(lease)
                receipt["leases"].append(entry)
            if entry["verified"]:
                done.add(lease)
        accessor = fields.get("token_accessor")
        if accessor:
            receipt["token"] = self._revoke_task_token(task_id, accessor, roles)
        if fields.get("jti"):
            receipt["jwt"] = {"jti": fields["jti"], "invalidated": True}
        done |= foreign
        token = receipt["token"] or {}
        settled = len(done) == len(leases) and (
            not accessor or token["verified"] or "ignored" in token
        )
        verified = settled and not foreign and "ignored" not in token
        receipt["verified"] = verified
        if settled:  # nothing left to retry (planted entries are dropped, never retried)
            self.store.forget_credentials(task_id)
        else:
            self.store.forget_credentials(task_id, done)
        return receipt

    def _revoke_task_token(
        self, task_id: str, accessor: str, roles: set[str] | None
    ) -> dict[str, Any]:
        try:
            why = self._not_ours(task_id, accessor, roles, task_token=True)
        except Undecided as exc:  # kept journaled: the next try, or the reaper, asks again
            return {"accessor": accessor, "revoked": False, "verified": False, "error": str(exc)}
        if why is None:
            return self._revoke_token(accessor)
        self._alarm(task_id, f"journaled token accessor ignored: {why}")
        return {"accessor": accessor, "verified": False, "ignored": why}

    # -- whose is a journal entry? ----------------------------------------------------------
    # The journal lives in Redis; the worker revokes only what Vault says is this task's.
    def _database_roles(self, task_id: str) -> set[str] | None:
        """The database roles of the task's grant; None when its record (or the grant on
        it) is gone, and only the kind of lease can be checked."""
        try:
            grant = json.loads(self.store.get(task_id)["grant"])
        except (AirlockError, KeyError, ValueError):
            return None
        return {str(s.get("role")) for s in grant.get("secrets", []) if s.get("kind") == "database"}

    def _not_ours(
        self, task_id: str, entry: str, roles: set[str] | None, task_token: bool = False
    ) -> str | None:
        """Why a journaled lease or accessor is not this task's to revoke, or None. Raises
        Undecided when Vault refuses to say whose a token is: such an entry is neither
        revoked nor dropped (a refusal proves nothing either way)."""
        if task_token or entry.startswith((WRAPPING, MINTING)):
            accessor = entry.removeprefix(WRAPPING).removeprefix(MINTING)
            try:
                found = self.vault.write(
                    "auth/token/lookup-accessor",
                    {"accessor": accessor},
                    absent_ok=True,
                    ride_out_s=0,
                )
            except VaultRefused as exc:
                raise Undecided(f"Vault refused to look it up ({exc})") from None
            if found is None:
                return None  # gone already: nothing to revoke, and verification says so
            data = found.get("data") or {}
            if entry.startswith(MINTING) and data.get("path") != f"auth/{TICKET_AUTH}/login":
                return "not a login with an admission ticket"
            if task_token or entry.startswith(MINTING):
                owner = (data.get("meta") or {}).get("task_id")
                return None if owner == task_id else f"a token of task {owner!r}, not this one"
            policies = data.get("policies") or []
            return None if policies == ["response-wrapping"] else "not a wrapping token"
        if not entry.startswith("database/creds/"):
            return "not a lease of a dynamic secret"
        role = entry.removeprefix("database/creds/").split("/", 1)[0]
        if roles is not None and role not in roles:
            return f"a lease of role {role!r}, which this task was not granted"
        return None

    def _alarm(self, task_id: str, text: str) -> None:
        log.warning("task %s: %s", task_id, text)
        try:
            self.store.alarm(task_id, text)
        except AirlockError:
            pass

    def _revoke_lease(self, lease: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": lease, "revoked": False, "verified": False}
        try:
            self.vault.write("sys/leases/revoke", {"lease_id": lease, "sync": True}, ride_out_s=0)
            entry["revoked"] = True
        except VaultRefused as exc:
            entry["error"] = str(exc)  # often: already gone, which verification settles
        entry["verified"] = self._gone("sys/leases/lookup", {"lease_id": lease})
        return entry

    def _revoke_token(self, accessor: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"accessor": accessor, "revoked": False, "verified": False}
        try:
            self.vault.write("auth/token/revoke-accessor", {"accessor": accessor}, ride_out_s=0)
            entry["revoked"] = True
        except VaultRefused as exc:
            entry["error"] = str(exc)
        entry["verified"] = self._gone("auth/token/lookup-accessor", {"accessor": accessor})
        return entry

    def _gone(self, path: str, body: dict[str, str]) -> bool:
        """Vault says it does not know this lease or token any more.

        Only that answer counts: a refused lookup (no permission) verifies nothing.
        """
        try:
            return self.vault.write(path, body, absent_ok=True, ride_out_s=0) is None
        except AirlockError as exc:
            log.warning("could not verify revocation at %s: %s", path, exc)
        return False
