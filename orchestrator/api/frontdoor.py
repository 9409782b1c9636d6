"""The front door's decisions, apart from HTTP: who the caller is (a bearer token verified
against the OIDC issuer), whom a task acts for (proven by that user's own token, RFC 8693's
subject token, never by a typed name), whether the callers policy lets it in (Rego:
agents, delegation, quotas), idempotent submission, and who may read which task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from typing import Any

from orchestrator.adapters.oidc import OidcVerifier
from orchestrator.adapters.store import Once, Quota, Store
from orchestrator.config import Settings
from orchestrator.core.caller import Identities, Principal
from orchestrator.core.ids import is_task_id
from orchestrator.core.spec import TaskSpec
from orchestrator.errors import Forbidden, InvalidId, InvalidSpec, TaskNotFound, Unauthenticated
from orchestrator.policy.bundle import Bundle, CallerDecision
from orchestrator.policy.engine import PolicyEngine
from orchestrator.submission import Submitter

IDEMPOTENCY_TTL_S = 24 * 3600
TOKEN_CACHE_SIZE = 10_000
DECISION_CACHE_SIZE = 10_000
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+@-")


def _over_quota(caller: Principal, quota: Quota, running: int, last_minute: int) -> list[str]:
    """Why a caller over its quota is refused, naming the callers policy's rule."""
    who = f"{caller.kind} '{caller.name}'"
    reasons = []
    if running >= quota.concurrent:
        reasons.append(
            f"callers.concurrent: {who} has {running} tasks running (quota {quota.concurrent})"
        )
    if last_minute >= quota.per_minute:
        reasons.append(
            f"callers.per_minute: {who} submitted {last_minute} tasks in the last minute "
            f"(quota {quota.per_minute})"
        )
    return reasons


def _principal_of(claims: dict[str, Any], issuer: str, subject: str, name: str) -> Principal:
    """The caller a verified token names: `kind` is the issuer's signed claim (a service's
    tokens say "service"), a user otherwise. Names that could not be keys are refused."""
    if not (0 < len(name) <= 128 and set(name) <= NAME_CHARS and name[0].isalnum()):
        raise Unauthenticated(f"token names no usable caller name ({name[:64]!r})")
    if claims.get("kind") == "service":
        return Principal(name, "service", issuer, subject)
    return Principal(name, "user", issuer, subject)


class FrontDoor:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        verifier: OidcVerifier,
        policy: PolicyEngine,
        submitter: Submitter,
        clock: Any = time.time,
    ) -> None:
        self.settings, self.store, self.verifier = settings, store, verifier
        self.policy, self.submitter, self.clock = policy, submitter, clock
        # token -> (caller, expiry): a token is verified once, and its expiry checked on
        # every use (a signature never changes its mind; the clock does).
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._decisions: dict[
            tuple[str, str, str, str, str | None], tuple[CallerDecision, str]
        ] = {}
        self._lock = threading.Lock()

    # -- who -----------------------------------------------------------------------------
    def known(self, token: str) -> Principal | None:
        """The caller of a token verified before and not yet expired (no I/O)."""
        with self._lock:
            known = self._verified.get(token)
        if known is not None and self.clock() < known[1]:
            return known[0]
        return None

    def expiry(self, token: str) -> float:
        """When a token verified before expires (0 if it is not known)."""
        with self._lock:
            known = self._verified.get(token)
        return known[1] if known else 0.0

    def authenticate(self, token: str) -> Principal:
        """Raises Unauthenticated (401) or ServiceUnavailable (issuer keys unavailable)."""
        known = self.known(token)
        if known is not None:
            return known
        caller = self.verifier.verify(token)
        principal = _principal_of(caller.claims, caller.issuer, caller.subject, caller.name)
        with self._lock:
            if len(self._verified) >= TOKEN_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = (principal, float(caller.claims["exp"]))
        return principal

    def user_for(self, caller: Principal, spec: TaskSpec, subject_token: str | None) -> str | None:
        """The user the task acts for, proven: by a subject token (that user's own token,
        verified like any other), or the calling user themselves. Raises Forbidden."""
        if subject_token:
            subject = self.authenticate(subject_token)
            if subject.kind != "user":
                raise Forbidden(["delegation: the subject token is not a user's"])
            if spec.on_behalf_of not in (None, subject.name):
                raise Forbidden(
                    [
                        f"delegation: on_behalf_of {spec.on_behalf_of!r} is not the subject "
                        f"token's user {subject.name!r}"
                    ]
                )
            return subject.name
        if spec.on_behalf_of is None:
            return None
        if caller.kind == "user" and spec.on_behalf_of == caller.name:
            return caller.name
        raise Forbidden(
            [
                f"delegation: acting for {spec.on_behalf_of!r} needs that user's own token "
                "(Airlock-Subject-Token header)"
            ]
        )

    # -- submit ---------------------------------------------------------------------------
    def decide(self, caller: Principal, agent: str, user: str | None) -> tuple[CallerDecision, str]:
        """The callers policy's decision and its JSON, reused while the bundle and the
        question are the same (it depends on nothing else; usage is counted by the store)."""
        return self._decided(self.policy.bundle(), caller, agent, user)

    def _decided(
        self, bundle: Bundle, caller: Principal, agent: str, user: str | None
    ) -> tuple[CallerDecision, str]:
        question = (bundle.version, caller.name, caller.kind, agent, user)
        known = self._decisions.get(question)
        if known is None:
            decision = bundle.decide_caller({"name": caller.name, "kind": caller.kind}, agent, user)
            known = (decision, json.dumps(decision.to_json()))
            with self._lock:
                if len(self._decisions) >= DECISION_CACHE_SIZE:
                    self._decisions.clear()
                self._decisions[question] = known
        return known

    async def submit(
        self,
        caller: Principal,
        spec: TaskSpec,
        subject_token: str | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[str, bool]:
        """Decide and enqueue; (task id, whether it was made now). A retried submit with the
        same Idempotency-Key gets the first task; `traceparent` is the caller's trace.
        Raises Forbidden, InvalidSpec, Unauthenticated or ServiceUnavailable; nothing is
        queued unless it returns.

        Runs on the event loop: what may block (fetching the issuer's keys, reloading an
        edited policy) goes to a thread, the rest is a cached decision and one Redis call."""
        if subject_token and self.known(subject_token) is None:
            await asyncio.to_thread(self.authenticate, subject_token)
        user = self.user_for(caller, spec, subject_token)
        bundle = self.policy.current()
        if bundle is None:
            decision, text = await asyncio.to_thread(self.decide, caller, spec.agent, user)
        else:
            decision, text = self._decided(bundle, caller, spec.agent, user)
        if not decision.allowed:
            raise Forbidden(list(decision.reasons))
        quota = Quota(
            caller.label,
            decision.quota["concurrent"],
            decision.quota["per_minute"],
            oldest_live=self.clock() - self.settings.max_timeout_s - 3600,
            ttl_s=self.settings.max_timeout_s + 3600,
        )
        once = None
        if idempotency_key:
            key = hashlib.sha256(f"{caller.label}\0{idempotency_key}".encode()).hexdigest()
            request = hashlib.sha256(f"{spec.to_json()}\0{user}".encode()).hexdigest()
            once = Once(key, request, IDEMPOTENCY_TTL_S)
        identities = Identities(caller, user)
        made = await self.submitter.send_async(spec, identities, quota, once, text, traceparent)
        if made.outcome == "quota":
            raise Forbidden(_over_quota(caller, quota, int(made.detail[0]), int(made.detail[1])))
        if made.outcome == "again":
            if once is None or made.detail[1] != once.request:
                raise InvalidSpec(["Idempotency-Key: already used for a different request"])
            return made.detail[0], False
        return made.detail[0], True

    # -- read -----------------------------------------------------------------------------
    def may_read_all(self, caller: Principal) -> bool:
        callers = self.policy.bundle().callers
        rights = (callers.users if caller.kind == "user" else callers.services).get(caller.name)
        return bool(rights and rights.read_all)

    def may_read(self, caller: Principal, record: dict[str, str]) -> bool:
        if record.get("submitter") == caller.label:
            return True
        if caller.kind == "user" and record.get("on_behalf_of") == caller.name:
            return True
        return self.may_read_all(caller)

    def record(self, caller: Principal, task_id: str) -> dict[str, str]:
        """The task's record if this caller may see it. Raises TaskNotFound otherwise (a
        task one may not read is one that does not exist, for them)."""
        if not is_task_id(task_id):
            raise InvalidId(task_id)
        record = self.store.get(task_id)
        if not self.may_read(caller, record):
            raise TaskNotFound(task_id)
        return record
