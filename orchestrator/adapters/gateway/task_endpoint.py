"""One task's endpoint handler: the socket it is served on is the task's identity.

It answers the runner's bootstrap exactly once, unwraps only this task's own wrapping tokens,
and is the proxy's policy for the task: the JWT as second factor, the compiled grant, the
request budget, injected credentials, and the audit record of every decision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from orchestrator.adapters import logs, telemetry
from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.gateway.decide import Target, Verdict, decide_request
from orchestrator.adapters.gateway.http import bearer_token
from orchestrator.adapters.gateway.limits import Budget, TaskLimits
from orchestrator.adapters.gateway.mcp import ToolSchemas
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.broker import Broker, Provisioned
from orchestrator.adapters.vault.identity import InvalidToken, Verifier
from orchestrator.core.grant import CompiledGrant, Grant
from orchestrator.errors import AirlockError

# A verified task token is trusted again, without re-checking, for this long: signature,
# audience and liveness are re-checked at most once a second per task. (The endpoint itself
# is closed the moment the task ends, which cuts every connection at once.)
ACCEPTED_FOR_S = 1.0


# An egress record's fields the HTTP semantic conventions name, and the ones that are ours.
EGRESS_SEMANTIC = {
    "method": "http.request.method",
    "host": "server.address",
    "port": "server.port",
    "path": "url.path",
    "status": "http.response.status_code",
}
EGRESS_OWN = (
    "task",
    "agent",
    "tool",
    "decision",
    "rule",
    "reason",
    "bytes_out",
    "bytes_in",
    "injected",
)


class TaskEndpoint:
    """Answers one task's endpoint. The socket it listens on is the task's identity."""

    def __init__(
        self,
        task_id: str,
        given: Provisioned,
        broker: Broker,
        store: Store,
        connections: dict[str, dict[str, Any]],
        grant: Grant,
        verifier: Verifier,
        audit: AuditLog,
        context: dict[str, Any],
        limits: TaskLimits | None = None,
        ca: Callable[[], str] | None = None,
    ) -> None:
        """`ca`: the gateway CA's certificate, which the task must trust for the tunnels
        the gateway intercepts (handed over with the bootstrap)."""
        self.task_id = task_id
        self.ca = ca
        self.given = given
        self.broker = broker
        self.store = store
        self.connections = connections
        self.grant = CompiledGrant(grant)
        self.tool_schemas = ToolSchemas()
        self.verifier = verifier
        self.audit_log = audit
        self.context = {
            "task": task_id,
            "agent": grant.agent,
            "on_behalf_of": grant.on_behalf_of,
            **context,
        }
        self._wrap_tokens = {s.token for s in given.secrets}
        self._accepted: dict[str, float] = {}
        # Tokens that failed, with why: a repeated forgery costs a lookup, not a verification.
        self._refused: dict[str, str] = {}
        self.budget = Budget(limits or TaskLimits())
        self._verdicts: dict[Target, Verdict] = {}
        self._fetched = False
        self._lock = threading.Lock()

    # -- the proxy's policy ---------------------------------------------------------------
    def authenticate(self, header: str | None) -> str | None:
        token = bearer_token(header)
        if token is None:
            return "no task token (Proxy-Authorization: Bearer <task JWT>)"
        now = time.monotonic()
        if self._accepted.get(token, 0.0) > now:
            return None  # this token passed every check less than a second ago
        known = self._refused.get(token)
        if known is not None:
            return known
        try:
            claims = self.verifier.verify(token)
        except InvalidToken as exc:
            return self._remember(token, f"task token refused: {exc}")
        if claims.get("task_id") != self.task_id:
            return self._remember(token, "task token of another task")
        left = float(claims["exp"]) - time.time()
        self._accepted = {token: now + min(ACCEPTED_FOR_S, left)}
        return None

    def credential(self, name: str) -> str | None:
        return self.given.injected.get(name)

    def _remember(self, token: str, why: str) -> str:
        if len(self._refused) >= 256:
            self._refused.clear()
        self._refused[token] = why
        return why

    def count_request(self) -> str | None:
        return self.budget.request()

    def at_door(self) -> str | None:
        return self.budget.request() if self.budget.spent() else None

    def tunnel(self, delta: int) -> str | None:
        return self.budget.tunnel(delta)

    def relayed(self, count: int) -> str | None:
        return self.budget.relayed(count)

    def finish(self) -> None:
        """The task's endpoint closes: write what the denial bound held back."""
        self._summarize(self.budget.unlogged())

    def _summarize(self, unlogged: int) -> None:
        if unlogged:
            self._write(
                {
                    "method": "?",
                    "decision": "deny",
                    "rule": "limits",
                    "reason": f"{unlogged} more denied requests, not logged one by one "
                    f"(over {self.budget.limits.denials_logged_per_s} a second)",
                    "suppressed": unlogged,
                }
            )

    def decide(self, target: Target) -> Verdict:
        # The grant never changes during the task, so a verdict holds for the same target.
        verdict = self._verdicts.get(target)
        if verdict is None:
            if len(self._verdicts) >= 512:
                self._verdicts.clear()
            verdict = self._verdicts[target] = decide_request(self.grant, target)
        return verdict

    def audit(self, record: dict[str, Any]) -> None:
        if record.get("decision") == "deny":
            individually, unlogged = self.budget.denial()
            self._summarize(unlogged)
            if not individually:
                return
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        logs.current_task.set(self.task_id)
        full = {**self.context, **record}
        self._span(full)  # before the traceparent is taken out of the record
        meters = telemetry.meters()
        labels = {
            "airlock.decision": str(full.get("decision")),
            "airlock.agent": str(full.get("agent")),
        }
        meters.egress.add(1, labels)
        meters.egress_duration.record(float(full.get("duration_ms") or 0) / 1000, labels)
        traceparent = str(full.pop("traceparent", "") or "")
        if traceparent.count("-") == 3:
            full["trace_id"] = traceparent.split("-")[1]
        self.audit_log.submit(full)

    def _span(self, record: dict[str, Any]) -> None:
        """One span per egress decision, under the task's run span."""
        parent = telemetry.extract(record.get("traceparent"))
        if parent is None:
            return
        end = time.time_ns()
        start = end - int(float(record.get("duration_ms") or 0) * 1e6)
        # The gateway serves the task's request: a server span, in the HTTP conventions,
        # with the decision and its rule as Airlock's own attributes.
        span = telemetry.tracer().start_span(
            f"egress {record.get('method')} {record.get('host')}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start,
        )
        attributes: dict[str, Any] = {
            semantic: record[name]
            for name, semantic in EGRESS_SEMANTIC.items()
            if record.get(name) not in (None, "", 0)
        }
        attributes.update(
            {f"airlock.{k}": v for k, v in record.items() if k in EGRESS_OWN and v is not None}
        )
        span.set_attributes(attributes)
        if record.get("decision") == "deny":
            span.set_attribute("error.type", "airlock.denied")
            span.set_status(Status(StatusCode.ERROR, str(record.get("reason"))))
        span.end(end_time=end)

    def __call__(
        self, method: str, target: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if method != "POST":
            return 405, {"error": "only POST"}
        if target == "/v1/bootstrap":
            return self._bootstrap()
        if target in ("/v1/wrapping/lookup", "/v1/wrapping/unwrap"):
            token = body.get("token")
            if token not in self._wrap_tokens:
                self.store.alarm(self.task_id, f"{target} with a token not given to this task")
                return 403, {"error": "not a wrapping token of this task"}
            try:
                if target.endswith("lookup"):
                    return 200, self.broker.lookup_wrapping(str(token))
                return 200, self.broker.unwrap(str(token))
            except AirlockError as exc:
                return 409, {"error": str(exc)}
        return 404, {"error": f"no such endpoint {target}"}

    def granted_tunnel(self, authority: str) -> tuple[str, int] | None:
        """The address of a granted database secret, which needs no egress rule."""
        host, _, port = authority.rpartition(":")
        for secret in self.given.secrets:
            address = self.connections.get(secret.kind) or {}
            if address and (host, port) == (str(address["host"]), str(address["port"])):
                return str(address["host"]), int(address["port"])
        return None

    def _bootstrap(self) -> tuple[int, dict[str, Any]]:
        ca = self.ca() if self.ca else None  # before the one fetch is spent: it may fail
        with self._lock:
            if self._fetched:
                self.store.alarm(self.task_id, "second bootstrap fetch refused")
                return 409, {"error": "bootstrap already fetched"}
            self._fetched = True
        secrets = [
            {**s.bootstrap(), "connection": self.connections.get(s.kind)}
            for s in self.given.secrets
        ]
        placeholders = {name: f"airlock-placeholder:{name}" for name in self.given.injected}
        for secret in self.given.secrets:  # every hand-out is on the record
            lasting = secret.kind == "kv"
            self.audit(
                {
                    "method": "BOOTSTRAP",
                    "host": "",
                    "decision": "allow",
                    "rule": f"secret:{secret.name}",
                    "reason": (
                        f"static {secret.kind} secret handed to the task (deliver: task); "
                        "it stays valid after the task ends"
                        if lasting
                        else f"dynamic {secret.kind} secret, revoked with the task"
                    ),
                }
            )
        return 200, {
            "task_id": self.task_id,
            "jwt": self.given.jwt.jwt,
            "secrets": secrets,
            "placeholders": placeholders,
            "tls_ports": self.grant.tls_ports(),
            **({"ca": ca} if ca else {}),
        }
