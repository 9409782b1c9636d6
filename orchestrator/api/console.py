"""The ops console, `/ui/`: server-rendered pages over the same store and identities as the
API, live through server-sent events, readable without JavaScript.

Signing in takes a bearer token from the deployment's OIDC issuer (on the local stack:
`airlock dev token NAME`), verified exactly as the API verifies one; the browser keeps it in
an HttpOnly, SameSite=Strict cookie scoped to /ui, until the token expires. What a viewer
sees follows the API's rules: ops (callers with `read_all`) see every task, a user the tasks
they submitted or that act for them; a task one may not read does not exist for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.api.frontdoor import FrontDoor
from orchestrator.client import Client, present
from orchestrator.core.caller import Principal
from orchestrator.core.lifecycle import TERMINAL, TaskState
from orchestrator.core.waterfall import across_hosts
from orchestrator.core.waterfall import rows as waterfall_rows
from orchestrator.errors import AirlockError

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COOKIE = "airlock_console"
LIVE_PERIOD_S = 0.5  # how often the live views look for a change
SCAN = 10_000  # how far back the task list looks for matches
PAGE = 250  # records (or audit entries) read at a time
AUDIT_ROWS = 200  # decisions the audit page shows
AUDIT_SCAN = 50_000  # audit entries it reads back at most to find them
USER_TASKS = 100  # a user's audit page: the decisions of their newest tasks
CHAIN_CHECK_S = 30.0
CHAIN_IDLE_S = 300.0
TASK_ROWS = 1000  # a task's newest decisions its page shows
# The console runs no inline script or style: everything comes from /ui/static.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends its forms with Origin:
    # null, and the console checks that a sign-in comes from its own pages.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: str | None) -> str:
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clock(at: Any) -> str:
    """An epoch time as UTC date and time."""
    try:
        return datetime.fromtimestamp(float(at), UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return ""


def _took(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _age(task: dict[str, Any], now: float) -> str:
    """How long the task has lived (to its end, if it ended)."""
    if not task.get("created_at"):
        return ""
    end = (
        datetime.fromisoformat(task["finished_at"]).timestamp() if task.get("finished_at") else now
    )
    return _took(end - datetime.fromisoformat(task["created_at"]).timestamp())


def _user(task: dict[str, Any]) -> str:
    """The person a task is for: the user it acts for, or the user who submitted it."""
    if task.get("on_behalf_of"):
        return str(task["on_behalf_of"])
    submitter = str(task.get("submitter") or "")
    return submitter.removeprefix("user:") if submitter.startswith("user:") else ""


def _limits(task: dict[str, Any]) -> str:
    limits = (task.get("grant") or {}).get("limits") or {}
    if not limits:
        return ""
    memory = int(limits.get("memory", 0)) >> 20
    return f"{limits.get('cpus')} cpu, {memory} MiB, {limits.get('pids')} pids"


templates.filters["when"] = _when
templates.filters["clock"] = _clock
templates.globals["limits"] = _limits
templates.globals["user_of"] = _user


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


class Console:
    """The pages, over the front door's identities and the store."""

    def __init__(self, front: FrontDoor, client: Client, audit: AuditLog) -> None:
        self.front, self.client, self.audit = front, client, audit
        self._lock = threading.Lock()
        self._chains: dict[str, Any] | None = None
        self._checker: threading.Thread | None = None
        self._asked = 0.0

    # -- who ------------------------------------------------------------------------------
    async def viewer(self, request: Request) -> Principal | None:
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        known = self.front.known(token)
        if known is not None:
            return known
        try:
            return await run_in_threadpool(self.front.authenticate, token)
        except AirlockError:
            return None

    def chains(self) -> dict[str, Any] | None:
        """The audit chains as last checked against their signed anchors. The check reads
        the whole audit, so it runs on a thread of its own every CHAIN_CHECK_S while
        operators look (it stops after CHAIN_IDLE_S unasked), never on a page's request;
        None until the first check is done."""
        with self._lock:
            self._asked = time.monotonic()
            if self._checker is None or not self._checker.is_alive():
                self._checker = threading.Thread(target=self._check_chains, daemon=True)
                self._checker.start()
            return self._chains

    def _check_chains(self) -> None:
        while True:
            try:
                checked, problems = self.audit.verify()
                result = {
                    "checked": checked,
                    "problems": [f"chain {p.chain}: {p.what} (entry {p.entry})" for p in problems],
                }
            except Exception as exc:  # shown on the page; the next round tries again
                log.warning("audit chain check failed: %s", exc)
                result = {"checked": 0, "problems": [f"could not verify: {exc}"]}
            result["at"] = _clock(time.time())
            with self._lock:
                self._chains = result
                if time.monotonic() - self._asked > CHAIN_IDLE_S:
                    return
            time.sleep(CHAIN_CHECK_S)

    def context(self, who: Principal, page: str) -> dict[str, Any]:
        return {"who": who, "page": page, "read_all": self.front.may_read_all(who)}

    def readable(self, who: Principal, records: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.front.may_read_all(who):
            return records
        return [r for r in records if self.front.may_read(who, r)]

    # -- data -----------------------------------------------------------------------------
    def runners(self, who: Principal) -> dict[str, Any]:
        """Live tasks and warm runners, grouped by worker host and queue."""
        store = self.front.store
        records = store.live_records()
        now = time.time()
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for record in self.readable(who, records):
            task = present(record)
            task["age"] = _age(task, now)
            key = (task.get("worker") or "(not yet taken)", task.get("queue") or "")
            groups.setdefault(key, []).append(task)
        for tasks in groups.values():
            tasks.sort(key=lambda t: t.get("created_at") or "", reverse=True)
        warm = []
        if self.front.may_read_all(who):  # a warm runner belongs to no task yet: ops only
            for member, info in sorted(store.pool_members().items()):
                age = _took(now - float(info.get("since", now)))
                warm.append({"id": member, "age": age, **info})
        return {
            "groups": sorted(groups.items()),
            "warm": warm,
            "count": sum(len(t) for t in groups.values()),
        }

    def tasks(self, who: Principal, filters: dict[str, str], limit: int) -> list[dict[str, Any]]:
        """Recent tasks this viewer may read, newest first, matching every filter given."""
        since = filters.get("since")
        cutoff = time.time() - float(since) if since else None
        found: list[dict[str, Any]] = []
        for record in self._newest_first(who):
            if any(
                value and record.get(field, "") != value
                for field, value in filters.items()
                if field in ("state", "agent", "submitter")
            ):
                continue
            if filters.get("user") and _user(record) != filters["user"]:
                continue
            if cutoff is not None and float(record.get("created_at") or 0) < cutoff:
                break  # newest first: everything after is older still
            found.append(present(record))
            if len(found) >= limit:
                break
        return found

    def _newest_first(self, who: Principal) -> Iterator[dict[str, str]]:
        """The records this viewer may read, newest first, read a page at a time (up to
        SCAN records): a page of the newest answers without reading the rest."""
        for offset in range(0, SCAN, PAGE):
            page = self.front.store.recent(PAGE, offset)
            yield from self.readable(who, page)
            if len(page) < PAGE:
                return

    def task(self, who: Principal, task_id: str) -> dict[str, Any]:
        task = present(self.front.record(who, task_id))
        spans = self.client.trace(task_id)
        task["waterfall"] = waterfall_rows(spans)
        task["across_hosts"] = across_hosts(task["waterfall"])
        entries = self.front.store.task_audit(task_id, TASK_ROWS)
        task["decisions"] = [json.loads(fields["record"]) for _, fields in entries]
        task["more_decisions"] = max(
            sum(int(v) for v in self.front.store.egress_counts([task_id])[0].values())
            - len(entries),
            0,
        )
        task["log"] = "".join(text for _, text in self.client.logs(task_id))
        return task


def _sse(event: str, data: str) -> str:
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


ui = APIRouter(prefix="/ui", include_in_schema=False)


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def _signed_in(request: Request) -> tuple[Console, Principal | None]:
    """The console, and who its cookie proves (None: nobody, or an expired token)."""
    console = _console(request)
    return console, await console.viewer(request)


def to_login(request: Request) -> Response:
    target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return RedirectResponse(f"/ui/login?next={target}", status_code=303)


def same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


@ui.get("/login")
async def login_page(request: Request, next: str = "/ui/") -> Response:
    return render("login.html", who=None, page="login", next=_local(next), error=None)


@ui.post("/login")
async def login(
    request: Request, token: str = Form(max_length=16384), next: str = Form("/ui/")
) -> Response:
    if not same_origin(request):
        return Response("cross-site sign-in refused", status_code=403)
    console, token = _console(request), token.strip()
    try:
        await run_in_threadpool(console.front.authenticate, token)
    except AirlockError as exc:
        return render("login.html", 401, who=None, page="login", next=_local(next), error=str(exc))
    expires = console.front.expiry(token)
    answer = RedirectResponse(_local(next), status_code=303)
    answer.set_cookie(
        COOKIE,
        token,
        max_age=max(int(expires - time.time()), 0),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return answer


@ui.post("/logout")
async def logout(request: Request) -> Response:
    if not same_origin(request):
        return Response("cross-site sign-out refused", status_code=403)
    answer = RedirectResponse("/ui/login", status_code=303)
    answer.delete_cookie(COOKIE, path="/ui")
    return answer


@ui.get("/")
async def runners(request: Request) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return to_login(request)
    data = await run_in_threadpool(console.runners, who)
    return render("runners.html", **console.context(who, "runners"), **data)


@ui.get("/runners/stream")
async def runners_stream(request: Request) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return Response(status_code=401)

    token = request.cookies.get(COOKIE, "")

    async def changes() -> AsyncIterator[str]:
        last = None
        quiet = 0.0
        # Until the viewer leaves, or their token expires.
        while not await request.is_disconnected() and console.front.known(token):
            data = await run_in_threadpool(console.runners, who)
            html = templates.get_template("runners_live.html").render(**data)
            if html != last:
                last, quiet = html, 0.0
                yield _sse("runners", html)
            elif quiet > 15:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(LIVE_PERIOD_S)
            quiet += LIVE_PERIOD_S

    return StreamingResponse(
        changes(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@ui.get("/tasks")
async def tasks(
    request: Request,
    state: str = "",
    agent: str = "",
    user: str = "",
    submitter: str = "",
    since: str = "",
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return to_login(request)
    filters = {
        "state": state,
        "agent": agent,
        "user": user,
        "submitter": submitter,
        "since": since if since.isdigit() else "",
    }
    found = await run_in_threadpool(console.tasks, who, filters, limit)
    return render(
        "tasks.html",
        **console.context(who, "tasks"),
        tasks=found,
        filters=filters,
        states=[s.value for s in TaskState],
    )


@ui.get("/tasks/{task_id}")
async def task(request: Request, task_id: str) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return to_login(request)
    try:
        found = await run_in_threadpool(console.task, who, task_id)
    except AirlockError:  # TaskNotFound among them: what one may not read does not exist
        return render("missing.html", 404, **console.context(who, "tasks"), task_id=task_id[:64])
    live = TaskState(found["state"]) not in TERMINAL
    return render("task.html", **console.context(who, "tasks"), task=found, live=live)


@ui.get("/tasks/{task_id}/logs/stream")
async def logs_stream(request: Request, task_id: str, after: int = 0) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return Response(status_code=401)
    try:
        await run_in_threadpool(console.front.record, who, task_id)
    except AirlockError:
        return Response(status_code=404)

    def lines() -> Iterator[str]:
        skipped = 0
        for stream, text in console.client.logs(task_id, follow=True):
            if skipped < after:  # what the page already shows
                skipped += len(text)
                continue
            yield _sse("log", json.dumps({"stream": stream, "text": text}))
        yield _sse("end", "{}")

    return StreamingResponse(
        lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@ui.get("/tasks/{task_id}/output/{name}")
async def output(request: Request, task_id: str, name: str) -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return to_login(request)
    try:
        await run_in_threadpool(console.front.record, who, task_id)
    except AirlockError:
        return Response(status_code=404)
    for found, data in await run_in_threadpool(console.client.output, task_id):
        if found == name:
            disposition = f"attachment; filename*=UTF-8''{quote(name)}"
            return Response(
                data,
                media_type="application/octet-stream",
                headers={**SECURITY_HEADERS, "Content-Disposition": disposition},
            )
    return Response(status_code=404)


@ui.get("/audit")
async def audit(request: Request, denied: bool = False, task: str = "") -> Response:
    console, who = await _signed_in(request)
    if who is None:
        return to_login(request)
    try:
        data = await run_in_threadpool(console_audit, console, who, denied, task)
    except AirlockError:  # a task this viewer may not read
        return render("missing.html", 404, **console.context(who, "audit"), task_id=task[:64])
    return render("audit.html", **console.context(who, "audit"), denied=denied, **data)


def console_audit(console: Console, who: Principal, denied: bool, task: str) -> dict[str, Any]:
    """Decisions across the tasks this viewer may read (newest first), and the chain check."""
    store = console.front.store
    if task:
        console.front.record(who, task)
        records = indexed_decisions(store, [task], denied)
    elif console.front.may_read_all(who):
        records = newest_decisions(store, denied, AUDIT_ROWS)
    else:  # a user's: through the index of each of their recent tasks
        mine = [r["id"] for r in console.readable(who, store.recent(1000))][:USER_TASKS]
        records = indexed_decisions(store, mine, denied)
    ops = console.front.may_read_all(who)
    return {
        "records": records,
        "verified": console.chains() if ops else None,
        "ops": ops,
        "task": task,
    }


def indexed_decisions(store: Any, tasks: list[str], denied: bool) -> list[dict[str, Any]]:
    """The newest decisions of `tasks`, through each task's audit index, newest first."""
    found = []
    for task_id in tasks:
        for _, fields in store.task_audit(task_id, AUDIT_ROWS):
            record = json.loads(fields["record"])
            if not denied or record.get("decision") == "deny":
                found.append(record)
    found.sort(key=lambda r: float(r.get("time") or 0), reverse=True)
    return found[:AUDIT_ROWS]


def newest_decisions(store: Any, denied: bool, count: int) -> list[dict[str, Any]]:
    """The newest `count` decisions (denials only, if `denied`) across every task, reading
    the audit stream backwards a page at a time, never more than AUDIT_SCAN entries."""
    found: list[dict[str, Any]] = []
    before, read = "+", 0
    while len(found) < count and read < AUDIT_SCAN:
        page = store.audit_newest(before, PAGE)
        for _, fields in page:
            record = json.loads(fields["record"])
            if not denied or record.get("decision") == "deny":
                found.append(record)
        read += len(page)
        if len(page) < PAGE:
            break
        before = "(" + page[-1][0]  # exclusive: the next page starts before this one
    return found[:count]


def _local(target: str) -> str:
    """A redirect target inside the console only (no open redirect)."""
    if target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


def mount(app: Any, console: Console) -> None:
    app.state.console = console
    app.include_router(ui)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
