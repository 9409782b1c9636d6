"""The front door's decisions, apart from HTTP: who the caller is (a bearer token verified
against the OIDC issuer), whom a task acts for (proven by that user's own token, RFC 8693's
subject token, never by a typed name), whether the callers policy lets it in (Rego:
agents, delegation, quotas), idempotent submission, and who may read which task.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import Any

from orchestrator.adapters.oidc import OidcVerifier
from orchestrator.adapters.store import Store
from orchestrator.config import Settings
from orchestrator.core.caller import Identities, Principal
from orchestrator.core.ids import is_task_id
from orchestrator.core.spec import TaskSpec
from orchestrator.errors import Forbidden, InvalidId, InvalidSpec, TaskNotFound, Unauthenticated
from orchestrator.policy.engine import PolicyEngine
from orchestrator.submission import Submitter

IDEMPOTENCY_TTL_S = 24 * 3600
TOKEN_CACHE_SIZE = 10_000
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+@-")


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
        self._lock = threading.Lock()

    # -- who -----------------------------------------------------------------------------
    def known(self, token: str) -> Principal | None:
        """The caller of a token verified before and not yet expired (no I/O)."""
        with self._lock:
            known = self._verified.get(token)
        if known is not None and self.clock() < known[1]:
            return known[0]
        return None

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
    def submit(
        self,
        caller: Principal,
        spec: TaskSpec,
        subject_token: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[str, bool]:
        """Decide and enqueue; (task id, whether it was made now). A retried submit with the
        same Idempotency-Key gets the first task. Raises Forbidden, InvalidSpec,
        Unauthenticated or ServiceUnavailable; nothing is queued unless it returns."""
        user = self.user_for(caller, spec, subject_token)
        usage = self.store.caller_usage(
            caller.label, self.clock() - self.settings.max_timeout_s - 3600
        )
        decision = self.policy.admit_caller(
            {"name": caller.name, "kind": caller.kind}, spec.agent, user, usage
        )
        if not decision.allowed:
            raise Forbidden(list(decision.reasons))
        task_id = str(uuid.uuid4())
        key = None
        if idempotency_key:
            key = hashlib.sha256(f"{caller.label}\0{idempotency_key}".encode()).hexdigest()
            request = hashlib.sha256(f"{spec.to_json()}\0{user}".encode()).hexdigest()
            first = self.store.idempotent(key, task_id, request, IDEMPOTENCY_TTL_S)
            if first is not None:
                if first[1] != request:
                    raise InvalidSpec(["Idempotency-Key: already used for a different request"])
                return first[0], False
        record = {"front_door": json.dumps({**decision.to_json(), "usage": usage})}
        # Counted before the record exists: a task that ends at once still leaves the count.
        self.store.caller_submitted(caller.label, task_id, self.settings.max_timeout_s + 3600)
        try:
            self.submitter.submit(spec, Identities(caller, user), record, task_id)
        except Exception:
            if key is not None:
                self.store.forget_idempotent(key)
            raise
        return task_id, True

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
