"""The egress gateway service, in this process or in its own (`airlock gateway`).

A worker opens a task's endpoint when it provisions the task and closes it at teardown.
`LocalGateway` serves the endpoints from the worker's own process; `RemoteGateway` asks an
`airlock gateway` process on the same host over its control socket (root-only, in the
endpoint directory), so one gateway serves every worker of the host and outlives their
restarts. The control socket carries what a task's endpoint needs to hand over (its JWT
and wrapping tokens); it never touches Redis or disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.gateway.endpoint import (
    EndpointServer,
    Handler,
    NoEndpoint,
    remove_endpoint_directory,
    stale_endpoints,
)
from orchestrator.adapters.gateway.interception import LeafCertificates
from orchestrator.adapters.gateway.limits import TaskLimits
from orchestrator.adapters.gateway.member_endpoint import MemberEndpoint
from orchestrator.adapters.gateway.task_endpoint import TaskEndpoint
from orchestrator.adapters.retry import ride_out
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.broker import Broker, Provisioned, WrappedSecret
from orchestrator.adapters.vault.identity import TaskToken, Verifier
from orchestrator.config import TASK_USER, Settings
from orchestrator.core.grant import Grant
from orchestrator.core.ids import endpoint_key, is_endpoint_key
from orchestrator.errors import ServiceUnavailable

log = logging.getLogger(__name__)
CONTROL_SOCKET = "gateway.sock"
RESTART_WAIT_S = 10.0  # how long a worker waits for a restarting gateway


class Gateway(Protocol):
    def open(self, task_id: str, given: Provisioned, grant: Grant, context: dict[str, Any]) -> Path:
        """Start serving the task's endpoint; the directory to mount into its container."""

    def open_member(self, member: str) -> Path:
        """Serve an unclaimed warm-pool member's endpoint (it speaks for nobody)."""

    def claim(
        self,
        member: str,
        task_id: str,
        given: Provisioned,
        grant: Grant,
        context: dict[str, Any],
        launch: dict[str, Any],
    ) -> Path:
        """Bind the member's endpoint to the task, then hand the runner its `launch`."""

    def close(self, task_id: str) -> bool:
        """Stop serving it, cut its connections, remove its directory."""

    def stale(self, live: Callable[[str], bool]) -> list[str]:
        """Endpoint directories whose task is not live."""

    def directory(self, task_id: str) -> Path: ...

    def bind(self, task_id: str, container_id: str) -> None:
        """The container whose processes alone may speak on the endpoint."""

    def trace(self, task_id: str, traceparent: str | None) -> None:
        """The span the task's egress decisions are recorded under."""

    def shutdown(self) -> None: ...


class LocalGateway:
    """Serves task endpoints from this process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        verifier: Verifier,
        audit: AuditLog,
        connections: dict[str, dict[str, Any]],
        certificates: LeafCertificates | None = None,
    ) -> None:
        self.settings, self.store, self.broker = settings, store, broker
        self.verifier, self.audit, self.connections = verifier, audit, connections
        self.certificates = certificates
        uid, _, gid = TASK_USER.partition(":")
        self.server = EndpointServer(
            settings.endpoint_dir / settings.namespace,
            settings.gateway_max_connections,
            settings.upstream_ca_file,
            (int(uid), int(gid or uid)),
            certificates,
        )
        audit.write_from(self.server.loop)  # its batches from the serving loop, no thread

    def open(self, task_id: str, given: Provisioned, grant: Grant, context: dict[str, Any]) -> Path:
        return self.server.open(task_id, self._handler(task_id, given, grant, context))

    def open_member(self, member: str) -> Path:
        return self.server.open(member, MemberEndpoint(member, self.server.loop))

    def claim(
        self,
        member: str,
        task_id: str,
        given: Provisioned,
        grant: Grant,
        context: dict[str, Any],
        launch: dict[str, Any],
    ) -> Path:
        waiting = self.server.handlers.get(member)
        if not isinstance(waiting, MemberEndpoint):
            raise ServiceUnavailable("gateway", f"warm runner {member} is not served here")
        directory = self.server.rebind(
            member, task_id, self._handler(task_id, given, grant, context)
        )
        waiting.release(launch)
        return directory

    def _handler(
        self, task_id: str, given: Provisioned, grant: Grant, context: dict[str, Any]
    ) -> Handler:
        return TaskEndpoint(
            task_id,
            given,
            self.broker,
            self.store,
            self.connections,
            grant,
            self.verifier,
            self.audit,
            context,
            TaskLimits(
                rate=self.settings.gateway_rate,
                max_requests=self.settings.gateway_max_requests,
                max_tunnels=self.settings.gateway_max_tunnels,
                max_bytes=self.settings.gateway_max_bytes,
            ),
            self.certificates.ca_pem if self.certificates else None,
        )

    def close(self, task_id: str) -> bool:
        return self.server.close(task_id)

    def stale(self, live: Callable[[str], bool]) -> list[str]:
        return self.server.stale(live)

    def directory(self, task_id: str) -> Path:
        return self.server.directory(task_id)

    def bind(self, task_id: str, container_id: str) -> None:
        self.server.bind(task_id, container_id)

    def trace(self, task_id: str, traceparent: str | None) -> None:
        handler = self.server.handlers.get(task_id)
        if handler is not None and traceparent:
            handler.context["traceparent"] = traceparent  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        self.server.shutdown(settle=self.audit.settled)
        self.audit.flush()


def encode_handout(
    task_id: str, given: Provisioned, grant: Grant, context: dict[str, Any]
) -> dict[str, Any]:
    """What the gateway needs of a task. The Vault task token itself stays with the worker."""
    return {
        "task_id": task_id,
        "grant": grant.model_dump(mode="json"),
        "context": context,
        "accessor": given.accessor,
        "secrets": [s.__dict__ for s in given.secrets],
        "jwt": {
            "jwt": given.jwt.jwt,
            "jti": given.jwt.jti,
            "expires_at": given.jwt.expires_at,
            "claims": given.jwt.claims,
        },
        "injected": given.injected,
    }


def decode_handout(doc: dict[str, Any]) -> tuple[str, Provisioned, Grant, dict[str, Any]]:
    given = Provisioned(
        token="",
        accessor=doc["accessor"],
        secrets=[WrappedSecret(**s) for s in doc["secrets"]],
        jwt=TaskToken(**doc["jwt"]),
        injected=dict(doc.get("injected") or {}),
    )
    return doc["task_id"], given, Grant.model_validate(doc["grant"]), dict(doc["context"])


class RemoteGateway:
    """Asks the host's `airlock gateway` process to serve task endpoints."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.endpoint_dir / settings.namespace
        self.control = settings.endpoint_dir / CONTROL_SOCKET

    def _connect(self) -> socket.socket:
        """The control socket; while the gateway restarts (refused, or not there yet), retried
        for up to RESTART_WAIT_S."""

        def connect() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            try:
                sock.connect(str(self.control))
            except OSError:
                sock.close()
                raise
            return sock

        return ride_out(
            connect,
            RESTART_WAIT_S,
            lambda exc: isinstance(exc, (ConnectionRefusedError, FileNotFoundError)),
        )

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            with self._connect() as sock:
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as reply:
                    answer = json.loads(reply.readline() or b"{}")
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable("gateway", f"{self.control}: {exc}") from exc
        if not answer.get("ok"):
            raise ServiceUnavailable("gateway", str(answer.get("error", "no answer")))
        return dict(answer)

    def open(self, task_id: str, given: Provisioned, grant: Grant, context: dict[str, Any]) -> Path:
        answer = self._call(
            {"op": "open", "handout": encode_handout(task_id, given, grant, context)}
        )
        return Path(answer["endpoint_dir"])

    def open_member(self, member: str) -> Path:
        return Path(self._call({"op": "open_member", "member": member})["endpoint_dir"])

    def claim(
        self,
        member: str,
        task_id: str,
        given: Provisioned,
        grant: Grant,
        context: dict[str, Any],
        launch: dict[str, Any],
    ) -> Path:
        request = {
            "op": "claim",
            "member": member,
            "launch": launch,
            "handout": encode_handout(task_id, given, grant, context),
        }
        return Path(self._call(request)["endpoint_dir"])

    def close(self, task_id: str) -> bool:
        if not is_endpoint_key(task_id):
            log.warning("endpoint close refused for %r: not a task id", task_id[:80])
            return False
        try:
            return bool(self._call({"op": "close", "task_id": task_id})["removed"])
        except ServiceUnavailable:
            # The gateway is gone: its sockets went with it; the directory is ours to remove.
            return remove_endpoint_directory(self.directory(task_id))

    def stale(self, live: Callable[[str], bool]) -> list[str]:
        return stale_endpoints(self.root, live)

    def directory(self, task_id: str) -> Path:
        """Raises InvalidId for anything but a task id or a warm runner's key."""
        return self.root / endpoint_key(task_id)

    def bind(self, task_id: str, container_id: str) -> None:
        self._call({"op": "bind", "task_id": task_id, "container_id": container_id})

    def trace(self, task_id: str, traceparent: str | None) -> None:
        if traceparent:
            self._call({"op": "trace", "task_id": task_id, "traceparent": traceparent})

    def shutdown(self) -> None:
        pass


class GatewayService:
    """`airlock gateway`: the host's endpoints, and a control socket for its workers."""

    def __init__(self, local: LocalGateway, control: Path) -> None:
        self.local = local
        self.control = control
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline())
                    answer = service.dispatch(request)
                except NoEndpoint as exc:  # an ordinary answer, not a fault of the service
                    answer = {"ok": False, "error": str(exc)}
                except Exception as exc:  # the worker gets the reason; the service goes on
                    log.exception("gateway control request failed")
                    answer = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        control.parent.mkdir(parents=True, exist_ok=True)
        control.unlink(missing_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(str(control), Handler)
        os.chmod(control, 0o600)  # only the host's own Airlock processes may steer it

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "open":
            task_id, given, grant, context = decode_handout(request["handout"])
            directory = self.local.open(task_id, given, grant, context)
            return {"ok": True, "endpoint_dir": str(directory)}
        if op == "open_member":
            directory = self.local.open_member(str(request["member"]))
            return {"ok": True, "endpoint_dir": str(directory)}
        if op == "claim":
            task_id, given, grant, context = decode_handout(request["handout"])
            directory = self.local.claim(
                str(request["member"]), task_id, given, grant, context, dict(request["launch"])
            )
            return {"ok": True, "endpoint_dir": str(directory)}
        if op == "close":
            return {"ok": True, "removed": self.local.close(str(request["task_id"]))}
        if op == "bind":
            self.local.bind(str(request["task_id"]), str(request["container_id"]))
            return {"ok": True}
        if op == "trace":
            self.local.trace(str(request["task_id"]), str(request["traceparent"]))
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "tasks": len(self.local.server.handlers)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve_forever(self) -> None:
        log.info("gateway serving %s", self.control)
        try:
            self.server.serve_forever()
        finally:
            self.server.server_close()
            self.control.unlink(missing_ok=True)
            self.local.shutdown()

    def start(self) -> GatewayService:
        threading.Thread(target=self.serve_forever, daemon=True, name="gateway-control").start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
