"""The client of the HTTP API (AIRLOCK_API_URL): what the CLI and the Python client use
when a front door is configured. Same methods and results as `client.Client`, which reads
and submits directly (the operator's mode on a worker host).

Loads only the standard library's HTTP client: `airlock status` through the API costs
little more than starting Python and click.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from orchestrator.core.lifecycle import TERMINAL, Event, TaskState
from orchestrator.errors import (
    AirlockError,
    Forbidden,
    InvalidSpec,
    ServiceUnavailable,
    TaskNotFound,
    Unauthenticated,
)

if TYPE_CHECKING:
    from orchestrator.core.spec import TaskSpec

TIMEOUT_S = 30.0


def token_path() -> Path:
    """Where `airlock login` keeps the CLI's token."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "airlock" / "token"


def stored_token() -> str | None:
    """AIRLOCK_TOKEN, else the token `airlock login` stored."""
    token = os.environ.get("AIRLOCK_TOKEN")
    if token:
        return token.strip()
    try:
        return token_path().read_text().strip() or None
    except OSError:
        return None


def store_token(token: str) -> Path:
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)
    return path


class RemoteClient:
    def __init__(self, url: str, token: str | None = None, subject_token: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AirlockError(f"AIRLOCK_API_URL {url!r}: expected http(s)://HOST:PORT")
        self.url, self._parts = url.rstrip("/"), parts
        self.token = token if token is not None else stored_token()
        self.subject_token = subject_token or os.environ.get("AIRLOCK_SUBJECT_TOKEN") or None

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            import ssl  # lazy on purpose: plain-HTTP callers never load it

            context = ssl.create_default_context()
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = TIMEOUT_S,
    ) -> http.client.HTTPResponse:
        """Send one request; the open response if it succeeded. Raises the error a problem
        response names (401, 403, 404, 422, 503), or ServiceUnavailable."""
        sent = dict(headers or {})
        if not self.token:
            raise Unauthenticated("no token: run `airlock login`, or set AIRLOCK_TOKEN")
        sent["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            conn.request(method, f"{self._parts.path.rstrip('/')}{path}", data, sent)
            response = conn.getresponse()
        except OSError as exc:
            conn.close()
            raise ServiceUnavailable("airlock api", f"{self.url}: {exc}") from None
        if response.status >= 400:
            raise _error(response, path)
        return response

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        response = self._open(method, path, body, **kw)
        try:
            return json.loads(response.read())
        finally:
            response.close()

    # -- the same API as client.Client ---------------------------------------------------
    def submit(self, spec: TaskSpec | Mapping[str, Any], idempotency_key: str | None = None) -> str:
        data = spec if isinstance(spec, Mapping) else spec.model_dump(mode="json")
        data = {k: v for k, v in data.items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if self.subject_token:
            headers["Airlock-Subject-Token"] = self.subject_token
        return str(self._json("POST", "/v1/tasks", data, headers=headers)["id"])

    def status(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/tasks/{_id(task_id)}")
        return result

    def events(
        self, task_id: str, after: str = "0", timeout_s: float | None = None
    ) -> Iterator[Event]:
        """Every state change from the start (or after `after`); ends with the last. With
        `timeout_s`, a stream silent that long raises TimeoutError."""
        response = self._open(
            "GET",
            f"/v1/tasks/{_id(task_id)}/events",
            headers={"Last-Event-ID": after, "Accept": "text/event-stream"},
            timeout=timeout_s,
        )
        try:
            fields: dict[str, str] = {}
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line:
                    name, _, value = line.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
                    continue
                if fields.get("event") == "state" and "data" in fields:
                    data = json.loads(fields["data"])
                    previous = data.get("from")
                    yield Event(
                        fields.get("id", ""),
                        task_id,
                        TaskState(data["state"]),
                        data.get("reason", ""),
                        float(data.get("at") or 0),
                        TaskState(previous) if previous else None,
                    )
                fields = {}
        finally:
            response.close()

    def wait(
        self,
        task_id: str,
        timeout_s: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the task ends (or `timeout_s` passes); returns its status."""
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            for event in self.events(task_id, timeout_s=timeout_s):
                if on_event is not None:
                    on_event(event)
                if give_up is not None and time.monotonic() > give_up:
                    break
        except TimeoutError:
            pass
        return self.status(task_id)

    def wait_admission(self, task_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait until a worker has decided the task (or `timeout_s` passes); its status."""
        give_up = time.monotonic() + timeout_s
        while True:
            status = self.status(task_id)
            if status["state"] != TaskState.PENDING.value or time.monotonic() > give_up:
                return status
            time.sleep(0.02)

    def logs(self, task_id: str, follow: bool = False) -> Iterator[tuple[str, str]]:
        query = "?follow=true" if follow else ""
        response = self._open(
            "GET", f"/v1/tasks/{_id(task_id)}/logs{query}", timeout=None if follow else TIMEOUT_S
        )
        try:
            for line in response:
                if line.strip():
                    chunk = json.loads(line)
                    yield chunk["stream"], chunk["text"]
        finally:
            response.close()

    def cancel(self, task_id: str, by: str | None = None) -> str:
        return str(self._json("POST", f"/v1/tasks/{_id(task_id)}/cancel")["result"])

    def tasks(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = urlencode({"limit": limit, **({"state": state} if state else {})})
        result: list[dict[str, Any]] = self._json("GET", f"/v1/tasks?{query}")
        return result

    def runners(self, limit: int = 30) -> list[dict[str, Any]]:
        """The live view: recent tasks with their egress counts, live ones first."""
        tasks = self.tasks(limit=limit)
        live = [t for t in tasks if TaskState(t["state"]) not in TERMINAL]
        return live + [t for t in tasks if TaskState(t["state"]) in TERMINAL]

    def trace(self, task_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", f"/v1/tasks/{_id(task_id)}/trace")
        return result

    def output(self, task_id: str) -> list[tuple[str, bytes]]:
        import base64  # lazy on purpose: only this read decodes files

        files = self._json("GET", f"/v1/tasks/{_id(task_id)}/output")
        return [(f["name"], base64.b64decode(f["base64"])) for f in files]

    def audit(self, task_id: str | None = None, denied: bool = False) -> list[dict[str, Any]]:
        query = urlencode({**({"task": task_id} if task_id else {}), "denied": str(denied).lower()})
        result: list[dict[str, Any]] = self._json("GET", f"/v1/audit?{query}")
        return result

    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/v1/whoami")
        return result

    def close(self) -> None:
        pass


def _id(task_id: str) -> str:
    return quote(task_id, safe="")


def _error(response: http.client.HTTPResponse, path: str) -> AirlockError:
    """The error a problem-details response stands for."""
    try:
        body = json.loads(response.read() or b"{}")
    except ValueError:
        body = {}
    finally:
        response.close()
    detail = str(body.get("detail") or response.reason)
    errors = [
        e if isinstance(e, str) else f"{e.get('field') or 'body'}: {e.get('message')}"
        for e in body.get("errors") or []
    ]
    status = response.status
    if status == 401:
        return Unauthenticated(detail.removeprefix("not authenticated: "))
    if status == 403:
        return Forbidden(errors or [detail])
    if status == 404:
        parts = path.split("?")[0].split("/")
        return TaskNotFound(unquote(parts[3]) if len(parts) > 3 else path)
    if status in (400, 413, 422):
        return InvalidSpec(errors or [detail])
    if status in (502, 503, 504):
        return ServiceUnavailable("airlock api", detail)
    return AirlockError(f"airlock api: HTTP {status}: {detail}")
