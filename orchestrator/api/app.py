"""The HTTP API (`airlock serve`): the front door for the CLI and for upstream systems in
any language. Versioned routes under /v1, OpenAPI 3.1 at /openapi.json (the task spec's
schema is the spec model's own), errors as RFC 9457 problem details.

Every route but health and the JWKS needs a bearer token from the OIDC issuer. Handlers
are plain functions, run on FastAPI's thread pool, so a token check that has to fetch the
issuer's keys never blocks the event loop; submit, the hot path, is a coroutine whose one
Redis call is asynchronous and which sends anything that may block to a thread.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.api.console import Console
from orchestrator.api.console import mount as mount_console
from orchestrator.api.frontdoor import FrontDoor
from orchestrator.client import Client, present
from orchestrator.core.caller import Principal
from orchestrator.core.lifecycle import TERMINAL, TaskState
from orchestrator.core.spec import TaskSpec
from orchestrator.errors import (
    AirlockError,
    Forbidden,
    InvalidId,
    InvalidSpec,
    PolicyError,
    ServiceUnavailable,
    TaskNotFound,
    Unauthenticated,
)

_log = logging.getLogger("airlock.api")

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 16 << 20  # how much of a refused body is read, at most, before the answer
KEEPALIVE_S = 10.0
PROBLEM = "application/problem+json"


class Submitted(BaseModel):
    id: str
    state: str
    created: bool


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


# error class -> (status, title); the first match wins
_STATUS: list[tuple[type[AirlockError], int, str]] = [
    (Unauthenticated, 401, "Unauthorized"),
    (Forbidden, 403, "Forbidden"),
    (InvalidSpec, 422, "Invalid request"),
    (InvalidId, 404, "Not found"),
    (TaskNotFound, 404, "Not found"),
    (ServiceUnavailable, 503, "Service unavailable"),
    (PolicyError, 503, "No policy in force"),
]


def _airlock_error(request: Request, exc: Exception) -> JSONResponse:
    for kind, status, title in _STATUS:
        if isinstance(exc, kind):
            break
    else:
        status, title = 500, "Internal error"
    headers = {}
    if isinstance(exc, Unauthenticated):
        reason = exc.reason.replace('"', "'")
        headers["WWW-Authenticate"] = f'Bearer error="invalid_token", error_description="{reason}"'
    if isinstance(exc, ServiceUnavailable):
        headers["Retry-After"] = "5"
    problems = getattr(exc, "problems", None)
    extra = {"errors": list(problems)} if problems and status < 500 else {}
    return problem(status, title, str(exc), headers, **extra)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the server's own: a problem answer that names nothing internal; the
    traceback goes to the server's log."""
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal error", "the server met an error it did not expect")


def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return problem(400, "Malformed JSON", "the request body is not valid JSON")
    lines = [
        {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
        for e in errors
    ]
    detail = "; ".join(f"{line['field'] or 'body'}: {line['message']}" for line in lines)
    return problem(422, "Invalid request", detail, errors=lines)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read what the client is still sending (up to a bound) before answering: a client
        # that writes its whole body before reading would otherwise meet a closed socket,
        # not the answer.
        drained = 0
        while drained <= DRAIN_BYTES:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        detail = f"the request body is larger than {self.limit} bytes"
        await problem(413, "Content too large", detail)(scope, receive, send)


# How an error becomes an answer, first match: the app's handlers and Served's alike.
_ERROR_ANSWERS: tuple[tuple[type[Exception], Callable[[Request, Exception], JSONResponse]], ...] = (
    (AirlockError, _airlock_error),
    (RequestValidationError, _invalid_request),
    (Exception, _unexpected),
)


class _TooLarge(Exception):
    pass


bearer = HTTPBearer(auto_error=False, description="an access token from the OIDC issuer")


# The dependencies are coroutines: a sync one costs a hop to the thread pool per request.
async def _front(request: Request) -> FrontDoor:
    front: FrontDoor = request.app.state.front
    return front


async def _client(request: Request) -> Client:
    client: Client = request.app.state.client
    return client


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    front: FrontDoor = request.app.state.front
    if credentials is None or not credentials.credentials:
        raise Unauthenticated("no bearer token (Authorization: Bearer ...)")
    known = front.known(credentials.credentials)
    if known is not None:
        return known
    # Verifying may fetch the issuer's keys: never on the event loop.
    return await run_in_threadpool(front.authenticate, credentials.credentials)


Front = Annotated[FrontDoor, Depends(_front)]
Reader = Annotated[Client, Depends(_client)]
Caller = Annotated[Principal, Depends(_caller)]
meta = APIRouter(tags=["meta"])
tasks = APIRouter(prefix="/v1/tasks", tags=["tasks"])


@meta.get("/v1/health")
def health(front: Front) -> dict[str, str]:
    front.store.ping()
    return {"status": "ok"}


@meta.get("/v1/whoami")
def whoami(front: Front, who: Caller) -> dict[str, Any]:
    """The caller this token proves, and whether it may read every task."""
    return {**who.to_json(), "read_all": front.may_read_all(who)}


@meta.get("/v1/jwks")
@meta.get("/.well-known/jwks.json", include_in_schema=False)
def task_jwks(request: Request) -> dict[str, Any]:
    """The keys that verify task JWTs (for upstreams that accept them)."""
    jwks: dict[str, Any] = request.app.state.jwks()
    return jwks


@tasks.post("", status_code=201, response_model=Submitted)
async def submit(
    spec: TaskSpec,
    request: Request,
    who: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    airlock_subject_token: Annotated[str | None, Header(max_length=16384)] = None,
    traceparent: Annotated[str | None, Header(max_length=512)] = None,
) -> Any:
    """Submit a task. With `Idempotency-Key`, a retry returns the first task (200). To act
    for a user, send their token in `Airlock-Subject-Token`. A W3C `traceparent` makes the
    task's trace a part of the caller's."""
    front: FrontDoor = request.app.state.front
    task_id, created = await front.submit(
        who, spec, airlock_subject_token, idempotency_key, traceparent
    )
    if created:
        state = TaskState.PENDING.value
    else:
        client: Client = request.app.state.client
        state = (await run_in_threadpool(client.status, task_id))["state"]
    body = {"id": task_id, "state": state, "created": created}
    headers = {"Location": f"/v1/tasks/{task_id}"}
    return JSONResponse(body, status_code=201 if created else 200, headers=headers)


_SUBMIT_HEADERS = (("idempotency-key", 255), ("airlock-subject-token", 16384), ("traceparent", 512))


async def _serve_submit(request: Request) -> Response:
    """`submit` without FastAPI's generic handler: the same bearer token, header and body
    checks, with the same errors, at a third of its cost (dependency solving costs more
    than the submit itself)."""
    who = await _caller(request, await bearer(request))
    errors: list[dict[str, Any]] = []
    headers: list[str | None] = []
    for name, longest in _SUBMIT_HEADERS:
        value = request.headers.get(name)
        if value is not None and len(value) > longest:
            errors.append(
                {
                    "type": "string_too_long",
                    "loc": ("header", name),
                    "msg": f"String should have at most {longest} characters",
                    "input": value,
                    "ctx": {"max_length": longest},
                }
            )
        headers.append(value)
    spec = None
    try:
        spec = TaskSpec.model_validate(await _json_body(request))
    except ValidationError as exc:
        errors += [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
    if errors or spec is None:
        raise RequestValidationError(errors)
    return await submit(spec, request, who, *headers)  # type: ignore[no-any-return]


async def _json_body(request: Request) -> Any:
    """The body as FastAPI would hand it to the model: parsed when it is declared JSON,
    else the raw bytes (which the model refuses). Raises RequestValidationError."""
    body = await request.body()
    if not body:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not (
        kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
    ):
        return body
    try:
        return json.loads(body)
    except ValueError as exc:
        invalid = {
            "type": "json_invalid",
            "loc": ("body",),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": str(exc)},
        }
        raise RequestValidationError([invalid]) from None


@tasks.get("")
def list_tasks(
    front: Front,
    who: Caller,
    state: TaskState | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 50,
) -> list[dict[str, Any]]:
    """Recent tasks this caller may read, newest first, with their egress counts."""
    every = front.may_read_all(who)
    scan = limit if every and state is None else max(limit * 10, 1000)
    shown = [
        present(record)
        for record in front.store.recent(scan)
        if (state is None or record["state"] == state.value)
        and (every or front.may_read(who, record))
    ][:limit]
    counts = front.store.egress_counts([task["id"] for task in shown])
    for task, count in zip(shown, counts, strict=True):
        task["egress_allowed"] = count.get("allow", 0)
        task["egress_denied"] = count.get("deny", 0)
    return shown


@tasks.get("/{task_id}")
def status(task_id: str, front: Front, who: Caller) -> dict[str, Any]:
    return present(front.record(who, task_id))


@tasks.post("/{task_id}/cancel")
def cancel(task_id: str, front: Front, client: Reader, who: Caller) -> dict[str, str]:
    front.record(who, task_id)
    return {"id": task_id, "result": client.cancel(task_id, by=who.label)}


@tasks.get("/{task_id}/output")
def output(task_id: str, front: Front, client: Reader, who: Caller) -> list[dict[str, Any]]:
    front.record(who, task_id)
    return [
        {"name": name, "size": len(data), "base64": base64.b64encode(data).decode()}
        for name, data in client.output(task_id)
    ]


@tasks.get("/{task_id}/trace")
def trace(task_id: str, front: Front, client: Reader, who: Caller) -> list[dict[str, Any]]:
    front.record(who, task_id)
    return client.trace(task_id)


@tasks.get(
    "/{task_id}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def logs(
    task_id: str, front: Front, client: Reader, who: Caller, follow: bool = False
) -> StreamingResponse:
    """stdout and stderr as NDJSON, one {"stream", "text"} per chunk; with `follow`, until
    the task has ended."""
    front.record(who, task_id)
    lines = (
        json.dumps({"stream": stream, "text": text}) + "\n"
        for stream, text in client.logs(task_id, follow)
    )
    return StreamingResponse(lines, media_type="application/x-ndjson")


@tasks.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def events(
    task_id: str,
    front: Front,
    who: Caller,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse:
    """Server-sent events: one `state` event per state change, from the start (or after
    `Last-Event-ID`); the stream ends after the terminal state."""
    front.record(who, task_id)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    stream = _events(front, task_id, last_event_id or "0")
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


@meta.get("/v1/audit", tags=["audit"])
def audit(
    front: Front, who: Caller, task: str | None = None, denied: bool = False
) -> list[dict[str, Any]]:
    """Egress decisions, allowed and denied, with who asked: one task's, or every task's for
    callers who may read all."""
    if task is not None:
        front.record(who, task)
    elif not front.may_read_all(who):
        raise Forbidden(["audit: name a task (?task=ID); only ops may read every task's"])
    return AuditLog(front.store).records(task, denied)


def create_app(
    front: FrontDoor,
    client: Client,
    jwks: Callable[[], dict[str, Any]],
    console: Console | None = None,
) -> FastAPI:
    app = FastAPI(
        title="Airlock",
        version="1",
        summary="Sealed, ephemeral runners for AI-agent tasks.",
        description=(
            "Submit tasks as a verified caller, follow them, read their results. Bearer "
            "tokens come from the deployment's OIDC issuer; to act for a user, present that "
            "user's token in `Airlock-Subject-Token` (RFC 8693 subject token). Errors are "
            "RFC 9457 problem details."
        ),
        # The API's spans are its submits: each one the server span of its request and the
        # root of its task's trace (Submitter.send_async). A span per read would make a
        # trace of its own for every status poll, and cost more than the read.
        telemetry={"tracing": False, "metrics": False},
    )
    app.state.front, app.state.client, app.state.jwks = front, client, jwks
    app.add_middleware(BodyLimit)
    for kind, handler in _ERROR_ANSWERS:
        app.add_exception_handler(kind, handler)
    app.include_router(meta)
    app.include_router(tasks)
    if console is not None:
        mount_console(app, console)
    return app


class Served:
    """The app as `airlock serve` runs it: POST /v1/tasks, the hot path, goes straight to
    `_serve_submit` (FastAPI still declares the route, for OpenAPI; the same body limit and
    problem answers), skipping the middleware and routing layers that cost as much as the
    submit itself; every other request goes to FastAPI."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._submit = BodyLimit(self._serve)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/tasks":
            scope["app"] = self.app
            await self._submit(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response: Response = await _serve_submit(request)
        except Exception as exc:  # answered as FastAPI's handlers would answer it
            handler = next(h for kind, h in _ERROR_ANSWERS if isinstance(exc, kind))
            response = handler(request, exc)
        await response(scope, receive, send)


def _events(front: FrontDoor, task_id: str, after: str) -> Iterator[str]:
    quiet_since = time.monotonic()
    while True:
        batch = front.store.events(task_id, after, block_ms=1000)
        for event in batch:
            after = event.id
            data = {
                "task": task_id,
                "state": event.state.value,
                "from": event.previous.value if event.previous else None,
                "reason": event.reason,
                "at": event.at,
            }
            yield f"id: {event.id}\nevent: state\ndata: {json.dumps(data)}\n\n"
            if event.state in TERMINAL:
                return
        if batch:
            quiet_since = time.monotonic()
        elif TaskState(front.store.get(task_id)["state"]) in TERMINAL:
            return  # ended, and every event already sent
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
