"""The egress gateway on a live task endpoint: real sockets, real JWTs, real upstreams.

Adversarial requests go straight at a task's socket from the host; ordinary clients run
inside a real sealed container. Every decision must be audited with who asked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import wiring
from orchestrator.adapters.gateway import http as gateway_http
from orchestrator.adapters.gateway.audit import AuditLog
from orchestrator.adapters.gateway.limits import Budget, TaskLimits
from orchestrator.adapters.store import Store
from orchestrator.adapters.vault.identity import InvalidToken, Verifier, transit_jwks
from orchestrator.config import jwt_issuer
from orchestrator.core.lifecycle import SIGNAL_CANCEL, TaskState
from orchestrator.core.spec import parse
from orchestrator.errors import ServiceUnavailable, TaskNotFound
from orchestrator.task.credentials import Credentials, Handout, task_verifier
from orchestrator.task.executor import Executor
from tests.upstream import (
    HTTP_PORT,
    IMPOSTOR_PORT,
    NAMED_HOST,
    PLAIN_CREDENTIALED_PORT,
    PROBE_WHEEL,
    TLS_PORT,
    Upstreams,
)

S = TaskState


@pytest.fixture(scope="module")
def upstreams(
    tmp_path_factory: pytest.TempPathFactory, credentials: Credentials
) -> Iterator[Upstreams]:
    servers = Upstreams(tmp_path_factory.mktemp("upstream"))
    # The gateway speaks TLS to credentialed upstreams: it must trust the test's CA.
    credentials.endpoints.server.tls.load_verify_locations(cadata=servers.ca_pem)  # type: ignore[attr-defined]
    yield servers
    servers.close()


class LiveTask:
    """A task record in state running with a real endpoint, as a worker would have it."""

    def __init__(self, executor: Executor, agent: str = "web") -> None:
        self.executor = executor
        self.store = executor.store
        self.id = str(uuid.uuid4())
        decision = executor.policy.admit(parse({"agent": agent, "command": ["true"]}))
        assert decision.grant is not None, decision.reasons
        self.grant = decision.grant
        self.store.create(self.id, {"agent": agent})
        self.store.redis.hset(self.store.key(self.id), "state", S.RUNNING.value)
        self.handout: Handout = executor.credentials.provision(
            self.id, self.grant, self.grant.digest(), time.time() + 120, {"model": "m"}
        )
        self.jwt = self.handout.provisioned.jwt.jwt
        self.socket = str(self.handout.endpoint_dir / "airlock.sock")
        self.others: list[LiveTask] = []

    def end(self) -> dict[str, Any]:
        for other in self.others:
            other.end()
        self.store.redis.hset(self.store.key(self.id), "state", S.SUCCEEDED.value)
        return self.executor.credentials.revoke(self.id)


@pytest.fixture
def task(executor: Executor, upstreams: Upstreams) -> Iterator[LiveTask]:
    live = LiveTask(executor)
    yield live
    live.end()


def hold_tunnels(task: LiveTask, count: int, held: list[socket.socket]) -> None:
    """Open `count` CONNECT tunnels of the task and keep them (in `held`) open."""
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        held.append(sock)
        sock.settimeout(10)
        sock.connect(task.socket)
        sock.sendall(connect(OPAQUE, task.jwt))
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def exchange(path: str, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a task socket; the status, headers and body of the answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at the door (over a limit): its answer is already in to read
        raw = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            raw += chunk
            head, _, body = raw.partition(b"\r\n\r\n")
            if b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
            elif head.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in raw:
                break  # a tunnel opened
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    return status, headers, body


def get(
    url: str, jwt: str | None, extra: str = "", method: str = "GET", host: str | None = None
) -> bytes:
    authority = url.split("/")[2]
    auth = f"Proxy-Authorization: Bearer {jwt}\r\n" if jwt else ""
    return (
        f"{method} {url} HTTP/1.1\r\nHost: {host or authority}\r\n{auth}{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def connect(authority: str, jwt: str | None, host: str | None = None) -> bytes:
    auth = f"Proxy-Authorization: Bearer {jwt}\r\n" if jwt else ""
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {host or authority}\r\n{auth}\r\n".encode()


API = f"http://127.0.0.1:{HTTP_PORT}/api/items"
OPAQUE = f"localhost:{TLS_PORT}"  # a passthrough rule's: an opaque tunnel


def test_allowed_request_is_forwarded_without_proxy_credentials(task: LiveTask) -> None:
    status, _headers, body = exchange(task.socket, get(API, task.jwt, "X-Trace: 1\r\n"))
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/api/items" and seen["headers"]["x-trace"] == "1"
    assert "proxy-authorization" not in seen["headers"]  # the JWT stops at the gateway


def test_the_upstream_gets_the_path_the_rule_saw(executor: Executor, task: LiveTask) -> None:
    """One normal form: escapes of unreserved characters decoded, dot segments removed; the
    rule, the audit and the upstream all see the same path."""
    spelled = f"http://127.0.0.1:{HTTP_PORT}/x/../ap%69/./items?q=%2e%2e"
    status, _headers, body = exchange(task.socket, get(spelled, task.jwt))
    assert status == 200, body
    assert json.loads(body)["path"] == "/api/items?q=%2e%2e"
    executor.credentials.audit.flush()
    last = AuditLog(executor.store).records(task.id)[-1]
    assert last["path"] == "/api/items" and last["decision"] == "allow"


def test_an_upstream_cannot_smuggle_an_answer_to_the_tasks_next_request(task: LiveTask) -> None:
    """An upstream that sends a second answer behind the first (response splitting) gets
    its first one passed on; the rest is never read as the answer to the task's next
    request on the same connection, and the connection it came on is not used again."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(task.socket)
        answers = [
            body
            for _, _, body in one_by_one(
                sock, get(f"http://127.0.0.1:{HTTP_PORT}/api/smuggle", task.jwt), get(API, task.jwt)
            )
        ]
    assert answers[0] == b"ok"
    assert json.loads(answers[1])["path"] == "/api/items", answers
    # An answer two parsers could read differently is not passed on at all.
    status, headers, body = exchange(
        task.socket, get(f"http://127.0.0.1:{HTTP_PORT}/api/bare-lf", task.jwt)
    )
    assert status == 502 and headers["x-airlock-denied"] == "upstream", body
    assert "malformed answer" in json.loads(body)["reason"]


def test_a_connection_that_stays_silent_is_closed(
    task: LiveTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that opens a task's socket and sends nothing, or half a request head and then
    nothing (slowloris), holds no connection past the idle timeout."""
    monkeypatch.setattr(gateway_http, "IDLE_TIMEOUT_S", 0.5)
    for opening in (b"", b"GET http://127.0.0.1/api/items HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(task.socket)
            sock.sendall(opening)
            while sock.recv(65536):  # TimeoutError (ours, at 10 s) if the gateway never closes
                pass  # a refusal, if any, then the close


def test_a_control_request_is_answered_however_long_its_handler_takes(
    task: LiveTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timeout is for silent peers: a runner waiting on a handler that waits on
    Vault (longer than the idle timeout here) still gets its answer."""
    from orchestrator.adapters.gateway.task_endpoint import TaskEndpoint

    answer = TaskEndpoint.__call__

    def slow(self: TaskEndpoint, method: str, target: str, body: dict[str, Any]) -> Any:
        time.sleep(1.0)
        return answer(self, method, target, body)

    monkeypatch.setattr(gateway_http, "IDLE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(TaskEndpoint, "__call__", slow)
    request = b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    status, _, body = exchange(task.socket, request)
    assert status == 404 and b"no such endpoint" in body, (status, body)


def test_basic_proxy_credentials_carry_the_jwt(task: LiveTask) -> None:
    basic = base64.b64encode(f"task:{task.jwt}".encode()).decode()
    status, _, _ = exchange(task.socket, get(API, None, f"Proxy-Authorization: Basic {basic}\r\n"))
    assert status == 200


def other_task_jwt(executor: Executor, task: LiveTask) -> str:
    """The valid JWT of another live task, presented on this task's socket."""
    other = LiveTask(executor)
    task.others.append(other)
    return other.jwt


ADVERSARIAL = [
    # name, request builder (task, executor) -> bytes, status, rule, reason fragment
    ("no token", lambda t, e: get(API, None), 407, "identity", "no task token"),
    ("garbage token", lambda t, e: get(API, "abc.def.ghi"), 407, "identity", "task token refused"),
    (
        "another task's token",
        lambda t, e: get(API, other_task_jwt(e, t)),
        407,
        "identity",
        "another task",
    ),
    (
        "expired token",
        lambda t, e: get(
            API, e.credentials.minter.mint(t.id, t.grant, t.grant.digest(), time.time() - 120).jwt
        ),
        407,
        "identity",
        "expired",
    ),
    (
        "metadata address",
        lambda t, e: get("http://169.254.169.254/latest/meta-data/", t.jwt),
        403,
        "default-deny",
        "no egress rule",
    ),
    (
        "metadata, mapped IPv6",
        lambda t, e: get("http://[::ffff:169.254.169.254]/", t.jwt),
        403,
        "default-deny",
        "no egress rule",
    ),
    ("metadata, decimal", lambda t, e: get("http://2852039166/", t.jwt), 403, "default-deny", ""),
    (
        "loopback, hex, ungranted port",
        lambda t, e: get(f"http://0x7f000001:{HTTP_PORT + 1}/api/", t.jwt),
        403,
        "plain",
        "port",
    ),
    (
        "loopback, octal, ungranted port",
        lambda t, e: get("http://0177.0.0.1:22/", t.jwt),
        403,
        "plain",
        "port 22",
    ),
    (
        "loopback, short form, path outside",
        lambda t, e: get(f"http://127.1:{HTTP_PORT}/admin", t.jwt),
        403,
        "plain",
        "path",
    ),
    (
        "a name resolving to loopback",
        lambda t, e: get(f"http://localhost:{HTTP_PORT}/", t.jwt),
        403,
        "ssrf",
        "loopback",
    ),
    (
        "dot segments",
        lambda t, e: get(f"http://127.0.0.1:{HTTP_PORT}/api/../admin", t.jwt),
        403,
        "plain",
        "path is outside",
    ),
    (
        "encoded dot segments",
        lambda t, e: get(f"http://127.0.0.1:{HTTP_PORT}/api/%2e%2e/admin", t.jwt),
        403,
        "plain",
        "path is outside",
    ),
    (
        "a path parameter that Tomcat reads as a dot segment",
        lambda t, e: get(f"http://127.0.0.1:{HTTP_PORT}/api/..;/admin", t.jwt),
        403,
        "ambiguous-path",
        "",
    ),
    (
        "an empty segment",
        lambda t, e: get(f"http://127.0.0.1:{HTTP_PORT}/api//admin", t.jwt),
        403,
        "ambiguous-path",
        "",
    ),
    (
        "method not granted",
        lambda t, e: get(API, t.jwt, method="DELETE"),
        403,
        "plain",
        "method DELETE",
    ),
    (
        "host header mismatch",
        lambda t, e: get(API, t.jwt, host="evil.example.com"),
        403,
        "host-mismatch",
        "",
    ),
    (
        "apex of a suffix rule",
        lambda t, e: connect("example.com:443", t.jwt),
        403,
        "default-deny",
        "",
    ),
    (
        "look-alike of a suffix rule",
        lambda t, e: connect("evil-example.com:443", t.jwt),
        403,
        "default-deny",
        "",
    ),
    (
        "suffix rule, wrong port",
        lambda t, e: connect("a.example.com:8443", t.jwt),
        403,
        "egress[0] *.example.com",
        "port 8443",
    ),
    (
        "CONNECT host mismatch",
        lambda t, e: connect(f"127.0.0.1:{TLS_PORT}", t.jwt, host="evil.test:443"),
        403,
        "host-mismatch",
        "",
    ),
    (
        "CONNECT to ssh on loopback",
        lambda t, e: connect("127.0.0.1:22", t.jwt),
        403,
        "forge",
        "port 22",
    ),
    (
        "CONNECT under a plain-HTTP rule",
        lambda t, e: connect(f"127.0.0.1:{HTTP_PORT}", t.jwt),
        403,
        "forge",
        f"port {HTTP_PORT} is not granted",
    ),
    (
        "https in absolute form",
        lambda t, e: get(f"https://127.0.0.1:{TLS_PORT}/api/", t.jwt),
        400,
        "scheme",
        "",
    ),
    (
        "CL and TE together",
        lambda t, e: (
            f"POST {API} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
            f"Proxy-Authorization: Bearer {t.jwt}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\n"
        ).encode(),
        400,
        "smuggling",
        "both Content-Length and Transfer-Encoding",
    ),
    (
        "repeated Content-Length",
        lambda t, e: (
            f"POST {API} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
            f"Proxy-Authorization: Bearer {t.jwt}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
        ).encode(),
        400,
        "smuggling",
        "repeated Content-Length",
    ),
    (
        "bad chunking",
        lambda t, e: (
            f"POST {API} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
            f"Proxy-Authorization: Bearer {t.jwt}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        ).encode(),
        400,
        "malformed",
        "",
    ),
    (
        "header name with a space",
        lambda t, e: (
            f"GET {API} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
            f"Proxy-Authorization: Bearer {t.jwt}\r\nContent Length: 0\r\n\r\n"
        ).encode(),
        400,
        "smuggling",
        "",
    ),
    (
        "a header line ending in a bare LF",
        lambda t, e: (
            f"POST {API} HTTP/1.1\r\nHost: 127.0.0.1:{HTTP_PORT}\r\n"
            f"Proxy-Authorization: Bearer {t.jwt}\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode(),
        400,
        "smuggling",
        "bare LF",
    ),
    (
        "a head of bare LFs only",
        lambda t, e: (
            f"GET {API} HTTP/1.1\nHost: 127.0.0.1:{HTTP_PORT}\nProxy-Authorization: Bearer {t.jwt}\n\n"
        ).encode(),
        400,
        "smuggling",
        "bare LF",
    ),
    ("pipelined requests", lambda t, e: get(API, t.jwt) * 2, 400, "pipelining", ""),
]


@pytest.mark.parametrize(
    ("name", "build", "status", "rule", "reason"),
    ADVERSARIAL,
    ids=[case[0] for case in ADVERSARIAL],
)
def test_adversarial_requests_are_denied_and_audited(
    executor: Executor, task: LiveTask, name: str, build: Any, status: int, rule: str, reason: str
) -> None:
    if name == "pipelined requests":  # the first one is served, the second refused
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(task.socket)
            sock.sendall(build(task, executor))
            everything = b""
            while chunk := sock.recv(65536):
                everything += chunk
        assert everything.count(b"HTTP/1.1 200") == 1 and b'"rule": "pipelining"' in everything
        return
    got, headers, body = exchange(task.socket, build(task, executor))
    assert got == status, body
    assert headers.get("x-airlock-denied") == rule, (headers, body)
    answer = json.loads(body)
    assert answer["rule"] == rule and reason in answer["reason"]
    executor.credentials.audit.flush()
    records = AuditLog(executor.store).records(task.id, denied=True)
    assert records, "the denial was not audited"
    last = records[-1]
    assert last["agent"] == "web" and last["task"] == task.id and last["model"] == "m"
    assert last["rule"] == rule and last["decision"] == "deny"


def test_a_tunnel_refused_for_want_of_a_token_names_its_target(
    executor: Executor, task: LiveTask
) -> None:
    """A client's first CONNECT often comes without credentials (it waits for the 407): the
    audit still says where it wanted to go."""
    status, headers, _ = exchange(task.socket, connect(f"127.0.0.1:{TLS_PORT}", None))
    assert status == 407 and headers.get("x-airlock-denied") == "identity"
    executor.credentials.audit.flush()
    last = AuditLog(executor.store).records(task.id, denied=True)[-1]
    assert (last["method"], last["host"], last["port"]) == ("CONNECT", "127.0.0.1", TLS_PORT)


def test_an_ended_task_is_refused(executor: Executor, task: LiveTask) -> None:
    executor.store.redis.hset(executor.store.key(task.id), "state", S.TEARING_DOWN.value)
    status, _, body = exchange(task.socket, get(API, task.jwt))
    assert status == 407 and b"no longer live" in body


def open_tunnel(task: LiveTask, authority: str) -> socket.socket:
    """A CONNECT tunnel of the task, answered 200 (the caller closes it)."""
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(task.socket)
    raw.sendall(connect(authority, task.jwt))
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return raw


def test_an_opaque_tunnel_carries_the_tasks_own_tls(task: LiveTask, upstreams: Upstreams) -> None:
    """A passthrough rule: the task's TLS goes end to end, the upstream's certificate
    arrives untouched."""
    with open_tunnel(task, OPAQUE) as raw:
        context = ssl.create_default_context(cadata=upstreams.ca_pem)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert b'"path": "/admin"' in reply  # no rule looks inside: passthrough means any path


def gateway_ca(executor: Executor) -> str:
    return str(executor.credentials.endpoints.certificates.ca_pem())  # type: ignore[attr-defined]


def inside(
    task: LiveTask, ca: str, *requests: bytes, authority: str = f"127.0.0.1:{TLS_PORT}"
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `requests` one after another on one intercepted tunnel, trusting the gateway
    CA alone; each answer (a closed connection ends the list)."""
    with open_tunnel(task, authority) as raw:
        context = ssl.create_default_context(cadata=ca)
        with context.wrap_socket(raw, server_hostname=authority.rsplit(":", 1)[0]) as tls:
            return one_by_one(tls, *requests)


def one_by_one(sock: socket.socket, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `requests` one after another on one connection; each answer (a closed
    connection ends the list)."""
    answers = []
    reader = sock.makefile("rb")
    for request in requests:
        try:
            sock.sendall(request)
            status_line = reader.readline()
        except OSError:
            break
        if not status_line:
            break
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
        answers.append((int(status_line.split()[1]), headers, body))
    return answers


def req(method: str, path: str, host: str = f"127.0.0.1:{TLS_PORT}", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\n\r\n".encode()


def test_an_intercepted_tunnel_decides_every_request_inside(
    executor: Executor, task: LiveTask, upstreams: Upstreams, vault: Any
) -> None:
    """The grant {secure: GET, POST under /api/ and /big} over HTTPS: inside the tunnel the
    gateway sees each request, as on plain HTTP. What once passed (any method, any path once
    the tunnel was open) is refused, the real credential is added upstream (the task holds a
    placeholder), and every decision is audited with its rule."""
    ca = gateway_ca(executor)
    real = vault.read("secret/data/airlock-tests/upstream")["data"]["data"]["token"]
    stolen = "Authorization: Bearer airlock-placeholder:upstream-token\r\n"
    ok = inside(task, ca, req("GET", "/api/one", extra=stolen), req("POST", "/api/two"))
    assert [status for status, _, _ in ok] == [200, 200], ok  # keep-alive inside the tunnel
    seen = json.loads(ok[0][2])
    assert seen["path"] == "/api/one" and seen["headers"]["authorization"] == f"Bearer {real}"
    assert "proxy-authorization" not in seen["headers"]
    for request, rule, reason in [
        (req("GET", "/admin/users"), "secure", "path is outside /api/, /big"),
        (req("DELETE", "/api/one"), "secure", "method DELETE is not granted"),
        (req("GET", "/api/..;/admin"), "ambiguous-path", "dot segments"),
        (req("GET", "/api/%2e%2e/admin"), "secure", "path is outside"),
        (req("GET", "/api/x", host="evil.test"), "host-mismatch", "Host header"),
        (req("GET", "http://127.0.0.1:18080/api/x"), "malformed", "a /path only"),
        (b"GET /api/x HTTP/1.1\nHost: 127.0.0.1:18443\n\n", "smuggling", "bare LF"),
    ]:
        (status, headers, body), *_ = inside(task, ca, request)
        assert status in (400, 403) and headers["x-airlock-denied"] == rule, (request, body)
        assert reason in json.loads(body)["reason"], body
    executor.credentials.audit.flush()
    records = AuditLog(executor.store).records(task.id)
    https = [(r["method"], r["path"], r["decision"]) for r in records if r.get("scheme") == "https"]
    assert ("GET", "/api/one", "allow") in https and ("GET", "/admin/users", "deny") in https
    assert ("CONNECT", None, "allow") in https


def test_an_intercepted_tunnel_refuses_what_is_not_tls_for_its_host(
    executor: Executor, task: LiveTask
) -> None:
    """Domain fronting (another server name than the CONNECT host) and plain text where TLS
    belongs are cut before anything reaches the upstream, and audited."""
    ca = gateway_ca(executor)
    with open_tunnel(task, f"127.0.0.1:{TLS_PORT}") as raw:
        context = ssl.create_default_context(cadata=ca)
        context.check_hostname = False  # the fronting client does not care; the gateway does
        with context.wrap_socket(raw, server_hostname="evil.test") as tls:
            tls.sendall(req("GET", "/api/x"))
            assert tls.recv(65536) == b""
    with open_tunnel(task, f"127.0.0.1:{TLS_PORT}") as raw:
        raw.sendall(req("GET", "/api/x"))
        assert raw.recv(65536) == b""
    executor.credentials.audit.flush()
    denied = AuditLog(executor.store).records(task.id, denied=True)
    assert [r["rule"] for r in denied[-2:]] == ["sni", "interception"], denied[-2:]
    assert "TLS server name 'evil.test' in a tunnel to 127.0.0.1" in denied[-2]["reason"]


def test_the_gateway_speaks_only_to_an_upstream_it_can_verify(
    executor: Executor, task: LiveTask, upstreams: Upstreams
) -> None:
    """An upstream under a certificate no one trusts (a man in the middle on the gateway's
    side): the task gets a 502, nothing is sent to it."""
    impostor = f"127.0.0.1:{IMPOSTOR_PORT}"
    (status, headers, body), *_ = inside(
        task, gateway_ca(executor), req("GET", "/api/x", host=impostor), authority=impostor
    )
    assert status == 502 and headers["x-airlock-denied"] == "upstream-tls", body
    assert "CERTIFICATE_VERIFY_FAILED" in json.loads(body)["reason"]


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        ("tls:evil.test", "TLS server name 'evil.test' is not the CONNECT host 'localhost'"),
        (b"GET /api/secure HTTP/1.1\r\nHost: localhost\r\n\r\n", "TLS handshake"),
    ],
)
def test_an_opaque_tunnel_must_carry_tls_for_its_connect_host(
    executor: Executor, task: LiveTask, upstreams: Upstreams, first_bytes: Any, reason: str
) -> None:
    """Domain fronting (a TLS server name other than the CONNECT host) and anything but a
    TLS handshake are cut before a byte reaches the upstream, and audited."""
    with open_tunnel(task, OPAQUE) as raw:
        if isinstance(first_bytes, bytes):
            raw.sendall(first_bytes)
            assert raw.recv(65536) == b""  # cut, nothing relayed back
        else:
            context = ssl.create_default_context(cadata=upstreams.ca_pem)
            context.check_hostname = False
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                context.wrap_socket(raw, server_hostname=first_bytes.removeprefix("tls:"))
    executor.credentials.audit.flush()
    last = AuditLog(executor.store).records(task.id, denied=True)[-1]
    assert last["rule"] == "sni" and reason in last["reason"], last


def test_a_tunnel_silent_before_its_client_hello_is_cut_and_audited(
    executor: Executor, task: LiveTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_http, "IDLE_TIMEOUT_S", 0.5)
    with open_tunnel(task, OPAQUE) as raw:
        assert raw.recv(65536) == b""  # cut at the idle timeout (ours: 10 s)
    executor.credentials.audit.flush()
    last = AuditLog(executor.store).records(task.id, denied=True)[-1]
    assert last["rule"] == "sni" and "no ClientHello" in last["reason"], last


def test_tunnels_are_cut_when_the_task_ends(executor: Executor, upstreams: Upstreams) -> None:
    live = LiveTask(executor)
    with open_tunnel(live, OPAQUE) as raw:
        receipt = live.end()
        assert receipt["endpoint_removed"] is True
        assert raw.recv(1) == b""  # the gateway closed the tunnel
    assert not Path(live.socket).exists()


def test_an_intercepted_tunnel_serves_nothing_once_the_task_ended(
    executor: Executor, upstreams: Upstreams
) -> None:
    """A tunnel opened while the task lived, its TLS already set up: after the task ends
    (its JWT revoked, its endpoint closed), not one more request inside it is served."""
    live = LiveTask(executor)
    with open_tunnel(live, f"127.0.0.1:{TLS_PORT}") as raw:
        context = ssl.create_default_context(cadata=gateway_ca(executor))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            reader = tls.makefile("rb")
            tls.sendall(req("GET", "/api/before"))
            assert reader.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            assert b"/api/before" in reader.read(length)
            assert live.end()["jwt"]["invalidated"] is True
            try:
                tls.sendall(req("GET", "/api/after"))
                answer = reader.readline()
            except OSError:
                answer = b""
            assert answer == b"", answer  # cut, not answered
    executor.credentials.audit.flush()
    paths = [r.get("path") for r in AuditLog(executor.store).records(live.id)]
    assert "/api/before" in paths and "/api/after" not in paths


CLIENTS = r"""
import http.client, json, os, ssl, urllib.request, urllib.error
api = "http://127.0.0.1:18080/api/from-container"
print("urllib http", json.loads(urllib.request.urlopen(api, timeout=10).read())["path"])
body = urllib.request.urlopen("https://127.0.0.1:18443/api/tls", timeout=10).read()
print("urllib https", json.loads(body)["path"], json.loads(body)["headers"]["authorization"][:10])
try:
    urllib.request.urlopen("https://127.0.0.1:18443/admin", timeout=10)
except urllib.error.HTTPError as exc:
    print("https denied", exc.code, exc.headers["X-Airlock-Denied"], json.loads(exc.read())["reason"])
context = ssl.create_default_context(cadata=os.environ["UPSTREAM_CA"])
body = urllib.request.urlopen("https://localhost:18443/opaque", timeout=10, context=context).read()
print("urllib opaque", json.loads(body)["path"])
proxy = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
proxy.request("POST", api, body=b"x" * 100000, headers={"Proxy-Authorization": "Bearer " + open(os.environ["AIRLOCK_TOKEN_FILE"]).read()})
answer = proxy.getresponse()
print("http.client via proxy", answer.status, json.loads(answer.read())["body"])
big = urllib.request.urlopen("http://127.0.0.1:18080/big", timeout=10).read()
print("streamed", len(big))
try:
    urllib.request.urlopen("http://127.0.0.1:18080/admin", timeout=10)
except urllib.error.HTTPError as exc:
    print("denied", exc.code, exc.headers["X-Airlock-Denied"], json.loads(exc.read())["reason"])
direct = http.client.HTTPConnection("127.0.0.1", 18080, timeout=5)
try:
    direct.request("GET", "/api/")
    print("direct: connected")
except OSError as exc:
    print("direct:", type(exc).__name__)
try:
    import socket
    socket.create_connection(("10.0.0.1", 80), timeout=3)
    print("outside: connected")
except OSError as exc:
    print("outside:", exc.errno)
"""


def test_real_clients_in_a_sealed_container(
    executor: Executor, store: Store, upstreams: Upstreams
) -> None:
    task_id = str(uuid.uuid4())
    state = executor.execute(
        task_id,
        {
            "agent": "web",
            "command": ["python3", "-c", CLIENTS],
            "env": {"UPSTREAM_CA": upstreams.ca_pem},
        },
    )
    logs = "".join(text for _, text in store.iter_logs(task_id))
    assert state is S.SUCCEEDED, logs
    assert "urllib http /api/from-container" in logs
    assert "urllib https /api/tls Bearer up-" in logs  # intercepted; the real token added
    assert "https denied 403 secure path is outside /api/, /big" in logs
    assert "urllib opaque /opaque" in logs
    assert "http.client via proxy 200 100000" in logs
    assert f"streamed {1 << 20}" in logs
    assert "denied 403 plain path is outside /api/, /big" in logs
    assert "direct: ConnectionRefusedError" in logs  # the container's loopback is its own
    assert "outside: 101" in logs  # ENETUNREACH: no route out but the gateway
    executor.credentials.audit.flush()
    records = AuditLog(store).records(task_id)
    decisions = [(r["method"], r.get("path"), r["decision"]) for r in records]
    assert ("GET", "/api/from-container", "allow") in decisions
    assert ("CONNECT", None, "allow") in decisions
    assert ("GET", "/admin", "deny") in decisions
    post = next(r for r in records if r["method"] == "POST")
    assert post["bytes_out"] == 100000 and post["status"] == 200 and post["port"] == HTTP_PORT
    assert all(r["agent"] == "web" and r["task"] == task_id for r in records)


def test_audit_chain_detects_tampering(settings: Any, store: Store) -> None:
    isolated = Store(settings.redis_url, f"{settings.namespace}-audit")
    log = AuditLog(isolated)
    for i in range(5):
        log.append({"task": "t", "decision": "allow", "n": i})
    assert log.verify() == (5, [])
    entries = list(log.entries())
    isolated.redis.xdel(isolated.keys.audit, entries[2][0])  # a record removed from the middle
    count, problems = log.verify()
    assert count == 4 and [p.what for p in problems] == [
        "link broken: a record before it was removed or changed"
    ]
    forged = dict(entries[2][1], decision="deny")
    isolated.redis.xadd(
        isolated.keys.audit,
        {
            "record": json.dumps(forged, sort_keys=True),
            "prev": entries[2][2],
            "hash": entries[2][3],
        },
    )
    _, problems = log.verify()
    assert "record changed after it was written" in [p.what for p in problems]
    isolated.redis.delete(isolated.keys.audit)
    log2 = AuditLog(isolated)
    for i in range(3):
        log2.append({"n": i})
    last = list(log2.entries())[-1][0]
    isolated.redis.xdel(isolated.keys.audit, last)  # the newest record removed
    _, problems = log2.verify()
    assert any(p.what.startswith("chain ends early") for p in problems)
    for key in isolated.redis.scan_iter(f"{settings.namespace}-audit:*"):
        isolated.redis.delete(key)


# --- MCP through the gateway, against a real MCP server ----------------------------------

MCP_PORT = 18090
MCP_URL = f"http://127.0.0.1:{MCP_PORT}/mcp"


SECURE_MCP_PORT = 18091
SECURE_MCP_URL = f"https://127.0.0.1:{SECURE_MCP_PORT}/mcp"


@pytest.fixture(scope="module")
def mcp_server(upstreams: Upstreams) -> Iterator[None]:
    """The test MCP server, over plain HTTP and over HTTPS (the upstreams' certificate)."""
    script = str(Path(__file__).parent / "mcp_server.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for args in (
            [str(MCP_PORT)],
            [str(SECURE_MCP_PORT), str(upstreams.cert), str(upstreams.key)],
        )
    ]
    try:
        for port in (MCP_PORT, SECURE_MCP_PORT):
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


class Relay:
    """127.0.0.1:PORT to a task's socket, from this process (the one peer the in-process
    gateway admits besides the task's container): a proxy address for host-side clients."""

    def __init__(self, socket_path: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socket_path = socket_path
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.socket_path)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()  # each socket is the source of one thread: closed once

    def close(self) -> None:
        self.listener.close()


def test_the_mcp_sdk_over_https_is_decided_message_by_message(
    executor: Executor, task: LiveTask, mcp_server: None
) -> None:
    """The official MCP client, speaking streamable HTTP over TLS through the gateway (a
    proxy, as any client would use it): the tunnel is intercepted, so the tool it is not
    granted is refused and left out of the list, exactly as over plain HTTP."""
    import anyio
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    relay = Relay(task.socket)
    context = ssl.create_default_context(cadata=gateway_ca(executor))

    async def session() -> tuple[list[str], Any, Any]:
        proxy = f"http://task:{task.jwt}@127.0.0.1:{relay.port}"
        async with (
            httpx2.AsyncClient(proxy=proxy, verify=context, trust_env=False, timeout=10) as http,
            streamable_http_client(SECURE_MCP_URL, http_client=http) as (read, write, *_),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            listed = [tool.name for tool in (await client.list_tools()).tools]
            added = await client.call_tool("add", {"a": 2, "b": 3})
            try:
                refused: Any = await client.call_tool("shell", {"command": "id"})
            except Exception as exc:  # the SDK's error for a JSON-RPC error answer
                refused = exc
            return listed, added, refused

    try:
        listed, added, refused = anyio.run(session)
    finally:
        relay.close()
    assert listed == ["add"]
    assert added.structured_content == {"result": 5}, added
    assert "tool secure-tools/shell is not granted" in str(refused), refused
    executor.credentials.audit.flush()
    calls = [
        (r.get("tool"), r["decision"], r["scheme"])
        for r in AuditLog(executor.store).records(task.id)
        if r.get("mcp_method") == "tools/call"
    ]
    assert ("add", "allow", "https") in calls and ("shell", "deny", "https") in calls


class McpClient:
    """A minimal streamable-HTTP MCP client that talks through a task's socket."""

    def __init__(self, socket_path: str, jwt: str) -> None:
        self.socket_path, self.jwt = socket_path, jwt
        self.session: str | None = None

    def post(self, message: Any) -> tuple[int, dict[str, str], Any]:
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(inner) -> None:
                inner.sock = socket.socket(socket.AF_UNIX)
                inner.sock.settimeout(10)
                inner.sock.connect(self.socket_path)

        conn = Conn("gateway")
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Proxy-Authorization": f"Bearer {self.jwt}",
            "Host": f"127.0.0.1:{MCP_PORT}",
        }
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        conn.request(
            "POST",
            MCP_URL,
            body=json.dumps(message) if not isinstance(message, bytes) else message,
            headers=headers,
        )
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        self.session = answer_headers.get("mcp-session-id", self.session)
        if answer_headers.get("content-type", "").startswith("text/event-stream"):
            data = [
                json.loads(line[5:])
                for line in raw.decode().splitlines()
                if line.startswith("data:")
            ]
            return response.status, answer_headers, data[-1] if data else None
        return response.status, answer_headers, json.loads(raw) if raw else None

    def start(self) -> None:
        status, _, answer = self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "airlock-test", "version": "1"},
                },
            }
        )
        assert status == 200 and answer["result"]["serverInfo"]["name"] == "airlock-test-tools"
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})


def call(ident: int, tool: str, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": ident,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def test_mcp_tools_are_checked_and_lists_filtered(
    executor: Executor, task: LiveTask, mcp_server: None
) -> None:
    client = McpClient(task.socket, task.jwt)
    client.start()
    status, _, listed = client.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert status == 200
    assert sorted(t["name"] for t in listed["result"]["tools"]) == ["add", "read_file"]

    status, _, added = client.post(call(2, "add", a=2, b=3))
    assert status == 200 and added["result"]["structuredContent"]["result"] == 5

    # The tool's own input schema, as the server listed it, holds too.
    status, headers, mistyped = client.post(call(21, "add", a="two", b=3))
    assert status == 403 and "do not match its input schema at a" in mistyped["error"]["message"]

    status, headers, denied = client.post(call(3, "shell", command="id"))
    assert status == 403 and headers["x-airlock-denied"] == "default-deny"
    assert denied["id"] == 3 and "tool tools/shell is not granted" in denied["error"]["message"]

    status, _, outside = client.post(call(4, "read_file", path="/etc/passwd"))
    assert (
        status == 403 and "argument 'path' must start with '/docs/'" in outside["error"]["message"]
    )
    status, _, inside = client.post(call(5, "read_file", path="/docs/readme"))
    assert status == 200 and "contents of /docs/readme" in json.dumps(inside)
    status, _, climbed = client.post(call(51, "read_file", path="/docs/../etc/passwd"))
    assert status == 403 and "not a plain path" in climbed["error"]["message"]
    # Every method is decided: another spelling of tools/call, or a resource no grant
    # names, is refused, never forwarded as "not a tool call".
    spelled = {**call(52, "shell", command="id"), "method": "Tools/Call"}
    read = {"jsonrpc": "2.0", "id": 53, "method": "resources/read", "params": {"uri": "file:///"}}
    for refused, rule in ((spelled, "mcp-method"), (read, "default-deny")):
        status, headers, answer = client.post(refused)
        assert status == 403 and headers["x-airlock-denied"] == rule, answer

    status, _, batch = client.post([call(6, "add", a=1, b=1), call(7, "shell", command="id")])
    assert status == 403 and [e["id"] for e in batch] == [6, 7]
    assert (
        "not sent" in batch[0]["error"]["message"] and "not granted" in batch[1]["error"]["message"]
    )

    status, _, malformed = client.post(b"{not json")
    assert status == 403 and "body is not JSON" in malformed["error"]["message"]

    executor.credentials.audit.flush()
    tools = [
        (r.get("tool"), r["decision"])
        for r in AuditLog(executor.store).records(task.id)
        if r.get("mcp_method") == "tools/call"
    ]
    assert (
        ("add", "allow") in tools and ("shell", "deny") in tools and ("read_file", "deny") in tools
    )


def test_per_task_limits(executor: Executor, task: LiveTask, upstreams: Upstreams) -> None:
    endpoints = executor.credentials.endpoints.server  # type: ignore[attr-defined]
    endpoints.max_connections = 2
    held = []
    try:
        hold_tunnels(task, 2, held)
        status, headers, _ = exchange(task.socket, get(API, task.jwt))
        assert status == 429 and headers["x-airlock-denied"] == "limits"
    finally:
        endpoints.max_connections = 64
        for sock in held:
            sock.close()
    handler = endpoints.handlers[task.id]
    handler.budget = Budget(TaskLimits(max_requests=2))  # type: ignore[attr-defined]
    statuses = [exchange(task.socket, get(API, task.jwt))[0] for _ in range(3)]
    assert statuses[-1] == 429
    executor.credentials.audit.flush()
    denied = AuditLog(executor.store).records(task.id, denied=True)
    assert [r["rule"] for r in denied].count("limits") >= 2


def test_a_flood_of_forged_tokens_is_rate_limited_and_its_audit_bounded(
    executor: Executor, task: LiveTask
) -> None:
    """13,000 forged requests in seconds once tripled another task's latency: now the task's
    own budget refuses them before any token is verified, and the audit keeps a bounded
    number of records plus a count of the rest."""
    handler: Any = executor.credentials.endpoints.server.handlers[task.id]  # type: ignore[attr-defined]
    handler.budget = Budget(TaskLimits(rate=20, denials_logged_per_s=5))
    verified = []
    real = handler.verifier.verify
    handler.verifier.verify = lambda token: verified.append(token) or real(token)
    statuses = [exchange(task.socket, get(API, f"forged.{n}.x"))[0] for n in range(300)]
    assert statuses.count(429) >= 200 and set(statuses) <= {407, 429}
    assert len(verified) <= 100  # burst 40, then 20 a second for the seconds this took
    task.end()
    executor.credentials.audit.flush()
    denied = AuditLog(executor.store).records(task.id, denied=True)
    individual = [r for r in denied if "suppressed" not in r]
    summaries = sum(int(r["suppressed"]) for r in denied if "suppressed" in r)
    assert len(individual) + summaries == 300  # every denial counted, few written one by one
    assert len(individual) < 100


def test_tunnels_and_bytes_have_a_budget_per_task(executor: Executor, task: LiveTask) -> None:
    handler: Any = executor.credentials.endpoints.server.handlers[task.id]  # type: ignore[attr-defined]
    handler.budget = Budget(TaskLimits(max_tunnels=2, max_bytes=200_000))
    held = []
    try:
        hold_tunnels(task, 2, held)
        status, _, body = exchange(task.socket, connect(OPAQUE, task.jwt))
        assert status == 429 and b"open tunnels" in body
    finally:
        for sock in held:
            sock.close()
    big = f"http://127.0.0.1:{HTTP_PORT}/big"  # 1 MiB
    assert exchange(task.socket, get(big, task.jwt), timeout=20)[0] == 200
    status, _, body = exchange(task.socket, get(API, task.jwt))
    assert status == 429 and b"bytes relayed" in body


def test_a_separate_gateway_process_serves_the_tasks(
    settings: Any, store: Store, runtime: Any, vault: Any, upstreams: Upstreams
) -> None:
    """`airlock gateway` serves the endpoints; the worker only steers it (AIRLOCK_GATEWAY=remote).

    A worker rides out a gateway restart, and a stopped gateway leaves no socket behind.
    """
    import signal
    import subprocess
    import tempfile
    import threading
    from dataclasses import replace

    from orchestrator.adapters.gateway.service import CONTROL_SOCKET
    from tests.conftest import airlock_env

    short = Path(tempfile.mkdtemp(prefix="al-"))  # unix socket paths are capped at 108 bytes
    remote = replace(settings, gateway="remote", endpoint_dir=short)
    control = remote.endpoint_dir / CONTROL_SOCKET
    procs: list[subprocess.Popen[bytes]] = []

    def start_gateway() -> None:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "gateway"],
                env=airlock_env(remote, AIRLOCK_ENDPOINT_DIR=str(remote.endpoint_dir)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )

    def run_task(path: str) -> None:
        task_id = str(uuid.uuid4())
        script = (
            "import json, urllib.request; print(json.loads(urllib.request.urlopen("
            f"'http://127.0.0.1:{HTTP_PORT}{path}', timeout=10).read())['path'])"
        )
        state = executor.execute(task_id, {"agent": "web", "command": ["python3", "-c", script]})
        logs = "".join(text for _, text in store.iter_logs(task_id))
        assert state is S.SUCCEEDED, (store.get(task_id)["reason"], logs)
        assert logs == f"{path}\n"
        receipt = json.loads(store.get(task_id)["revocation"])
        assert receipt["verified"] and receipt["endpoint_removed"] is True
        assert not (remote.endpoint_dir / remote.namespace / task_id).exists()

    start_gateway()
    try:
        for _ in range(100):
            if control.exists():
                break
            time.sleep(0.05)
        credentials = wiring.credentials(remote, store)
        executor = Executor(remote, store, runtime, credentials=credentials)
        run_task("/api/remote")
        procs[0].send_signal(signal.SIGKILL)  # a crash: its socket file stays, refusing
        procs[0].wait()
        restart = threading.Timer(1.0, start_gateway)
        restart.start()
        run_task("/api/after-restart")  # the worker waited for the new gateway
        restart.join()
        # An endpoint the gateway does not have (a restart forgets them): said plainly.
        with pytest.raises(ServiceUnavailable, match=r"gateway has no endpoint for .* restarted"):
            credentials.endpoints.bind(str(uuid.uuid4()), "some-container")
    finally:
        procs[-1].terminate()
        _, errors = procs[-1].communicate(timeout=10)
        left = control.exists()
        shutil.rmtree(short, ignore_errors=True)
        for proc in procs[:-1]:
            proc.communicate(timeout=10)
    assert procs[-1].returncode == 0, errors
    assert not left  # stopped as a service is stopped, it removed its control socket


def test_credentials_are_injected_only_over_tls_and_only_for_their_host(
    task: LiveTask, vault: Any
) -> None:
    real = vault.read("secret/data/airlock-tests/upstream")["data"]["data"]["token"]
    placeholder = "airlock-placeholder:upstream-token"

    def seen(port: int, authorization: str) -> dict[str, str]:
        url = f"http://127.0.0.1:{port}/api/credentialed"
        status, _, body = exchange(
            task.socket, get(url, task.jwt, f"Authorization: {authorization}\r\n")
        )
        assert status == 200, body
        return dict(json.loads(body)["headers"])

    # TLS upstream, credentialed: the client's copy is dropped, the real one added.
    assert seen(TLS_PORT, "Bearer stolen-by-the-agent")["authorization"] == f"Bearer {real}"
    assert seen(TLS_PORT, f"Bearer {placeholder}")["authorization"] == f"Bearer {real}"
    # Plain HTTP upstream, credentialed: no credential ever goes out in the clear.
    assert "authorization" not in seen(PLAIN_CREDENTIALED_PORT, f"Bearer {placeholder}")
    # Not a credentialed host: the placeholder is passed on as it is, never replaced.
    assert seen(HTTP_PORT, f"Bearer {placeholder}")["authorization"] == f"Bearer {placeholder}"
    bootstrap = exchange(
        task.socket, b"POST /v1/bootstrap HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert json.loads(bootstrap[2])["placeholders"] == {
        "upstream-token": placeholder,
        "upstream-identity": "airlock-placeholder:upstream-identity",
    }
    assert real not in bootstrap[2].decode()
    assert task.handout.provisioned.injected["upstream-identity"] not in bootstrap[2].decode()


def test_an_upstream_gets_a_token_for_its_own_audience_only(
    task: LiveTask, vault: Any, settings: Any
) -> None:
    """The gateway adds a task JWT minted for that upstream's audience: same subject and
    agent, expiring with the task. The upstream cannot replay it at the gateway, and the
    task's own token (for the gateway) never goes upstream."""
    status, _, body = exchange(
        task.socket,
        get(
            "http://localhost:18443/api/identity", task.jwt, f"Authorization: Bearer {task.jwt}\r\n"
        ),
    )
    assert status == 200, body
    presented = dict(json.loads(body)["headers"])["authorization"].removeprefix("Bearer ")
    assert presented != task.jwt
    upstream = Verifier(
        lambda: transit_jwks(vault),
        "https://upstream.airlock.test",
        jwt_issuer(settings),
        lambda task_id, jti: True,
    )
    claims = upstream.verify(presented)
    own = task.handout.provisioned.jwt.claims
    assert claims["aud"] == "https://upstream.airlock.test" and own["aud"] == "airlock-gateway"
    assert claims["sub"] == own["sub"] and claims["task_id"] == task.id
    assert claims["agent"] == "web" and claims["exp"] <= own["exp"]
    with pytest.raises(InvalidToken):
        task_verifier(settings, vault, task.store).verify(presented)
    # Replayed at the gateway as the task's own token: refused.
    status, _, _ = exchange(task.socket, get(f"http://127.0.0.1:{HTTP_PORT}/api/x", presented))
    assert status == 407  # proxy authentication required


def test_real_clients_under_gvisor(executor: Executor, store: Store, upstreams: Upstreams) -> None:
    if "runsc" not in executor.runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    task_id = str(uuid.uuid4())
    script = (
        "import json, urllib.request; print(json.loads(urllib.request.urlopen("
        f"'http://127.0.0.1:{HTTP_PORT}/api/gvisor', timeout=10).read())['path'])"
    )
    state = executor.execute(task_id, {"agent": "web-gvisor", "command": ["python3", "-c", script]})
    logs = "".join(text for _, text in store.iter_logs(task_id))
    assert state is S.SUCCEEDED, (store.get(task_id)["reason"], logs)
    assert logs == "/api/gvisor\n"
    assert json.loads(store.get(task_id)["grant"])["runtime"] == "runsc"


TOOLS_IMAGE = "airlock-runner-tools:latest"
# Clients no one here wrote, through the gateway as a task would use them: the runner's
# proxy settings and CA bundle only, nothing configured by hand.
REAL_CLIENTS = r"""
set -u
echo "curl $(curl -sS https://127.0.0.1:18443/api/curl | grep -o '"path": "[^"]*"')"
echo "curl denied $(curl -s -o /dev/null -w '%{http_code}' https://127.0.0.1:18443/admin)"
git clone -q https://127.0.0.1:18445/git/repo.git /workspace/repo && echo "git $(cat /workspace/repo/README)"
git ls-remote https://127.0.0.1:18445/private/repo.git >/dev/null 2>&1 || echo "git denied"
pip install -q --no-cache-dir --disable-pip-version-check --break-system-packages   --index-url https://127.0.0.1:18445/simple --target /workspace/lib airlock-probe   && echo "pip $(PYTHONPATH=/workspace/lib python3 -c 'import airlock_probe; print(airlock_probe.VALUE)')"
node -e '
const http = require("http"), https = require("https"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
const auth = Buffer.from(decodeURIComponent(proxy.username) + ":" + decodeURIComponent(proxy.password));
http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT", path: "127.0.0.1:18443",
              headers: {"Host": "127.0.0.1:18443",
                        "Proxy-Authorization": "Basic " + auth.toString("base64")}})
  .on("connect", (res, socket) => {
    https.get({host: "127.0.0.1", port: 18443, path: "/api/node",
               createConnection: () => tls.connect({socket, host: "127.0.0.1"})}, (answer) => {
      let body = ""; answer.on("data", (d) => body += d);
      answer.on("end", () => console.log("node", answer.statusCode, JSON.parse(body).path));
    }).on("error", (e) => console.log("node error", e.message));
  }).end();
'
node -e '
// fetch reads no proxy settings: the runner answers the name and serves the port itself.
const why = (e) => e.cause ? (e.cause.code || e.cause.message) : e.message;
fetch("https://upstream.airlock.test:18443/api/fetch").then((r) => r.json())
  .then((j) => console.log("fetch", j.path), (e) => console.log("fetch error", why(e)));
fetch("https://elsewhere.airlock.test:18443/api/fetch")
  .then((r) => console.log("fetch elsewhere", r.status), (e) => console.log("fetch elsewhere refused"));
' 2>/dev/null
python3 - <<'PY'
import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

async def main():
    # The SDK's own HTTP client: the proxy and CA bundle come from the runner's environment.
    async with streamable_http_client("https://127.0.0.1:18091/mcp") as (read, write, *_):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = [tool.name for tool in (await session.list_tools()).tools]
            added = await session.call_tool("add", {"a": 2, "b": 3})
            print("mcp", tools, added.structured_content)
            try:
                refused = await session.call_tool("shell", {"command": "id"})
                print("mcp shell", refused.is_error, refused.content[0].text[:80])
            except Exception as exc:
                print("mcp shell refused:", str(exc)[:120])

anyio.run(main)
PY
"""


@pytest.mark.parametrize("agent", ["web", "web-gvisor"])
def test_real_clients_over_https_in_a_sealed_container(
    executor: Executor, store: Store, upstreams: Upstreams, mcp_server: None, agent: str
) -> None:
    """curl, git (smart HTTP clone), pip (a PEP 503 index), Node's https and fetch, and the
    official MCP SDK, each speaking HTTPS to a local server through intercepted tunnels:
    allowed calls work with the gateway CA the runner hands them, denied ones get the
    gateway's 403 (or, for MCP, a JSON-RPC error naming the rule). fetch ignores proxy
    settings: it reaches the granted name through the runner's loopback port and nothing
    else."""
    if agent == "web-gvisor" and "runsc" not in executor.runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    task_id = str(uuid.uuid4())
    loop = executor.credentials.endpoints.server._loop  # type: ignore[attr-defined]
    real = loop.getaddrinfo

    async def named(host: str, port: int, **kwargs: Any) -> Any:
        # The gateway resolves the test's name as a deployment's DNS would.
        return await real("127.0.0.1" if host == NAMED_HOST else host, port, **kwargs)

    loop.getaddrinfo = named
    try:
        state = executor.execute(
            task_id,
            {
                "agent": agent,
                "image": TOOLS_IMAGE,
                "command": ["sh", "-c", REAL_CLIENTS],
                # git, pip and node at once: gVisor counts the sandbox's own memory too
                "limits": {"memory": "1g", "pids": 256},
            },
        )
    finally:
        loop.getaddrinfo = real
    logs = "".join(text for _, text in store.iter_logs(task_id))
    assert state is S.SUCCEEDED, (store.get(task_id)["reason"], logs)
    for line in [
        'curl "path": "/api/curl"',
        "curl denied 403",
        "git cloned through the gateway",
        "git denied",
        "pip probe",
        "node 200 /api/node",
        "fetch /api/fetch",
        "fetch elsewhere refused",
        "mcp ['add'] {'result': 5}",
        "tool secure-tools/shell is not granted",
    ]:
        assert line in logs, logs
    executor.credentials.audit.flush()
    records = AuditLog(store).records(task_id)
    seen = {(r["method"], (r.get("path") or "").split("?")[0], r["decision"]) for r in records}
    assert ("GET", "/git/repo.git/info/refs", "allow") in seen, seen
    assert ("POST", "/git/repo.git/git-upload-pack", "allow") in seen, seen
    assert ("GET", f"/files/{PROBE_WHEEL}", "allow") in seen, seen
    assert ("GET", "/private/repo.git/info/refs", "deny") in seen, seen
    assert ("GET", "/admin", "deny") in seen, seen
    assert ("GET", "/api/fetch", "allow") in seen, seen
    denied = {r["host"] for r in records if r["method"] == "CONNECT" and r["decision"] == "deny"}
    assert "elsewhere.airlock.test" in denied, records


BYPASS_PROBE = r"""
import socket
print("resolved", socket.gethostbyname("anything.airlock.test"))
plain = socket.create_connection(("127.0.0.1", 18443), timeout=5)
plain.sendall(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
print("plain text on a TLS port:", plain.recv(100) or "closed")
import ssl
into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
hello = ssl.create_default_context().wrap_bio(into, out, server_hostname="not_a.host")
try:
    hello.do_handshake()
except ssl.SSLWantReadError:
    pass
odd = socket.create_connection(("127.0.0.1", 18443), timeout=5)
odd.sendall(out.read())
print("a server name that is no host name:", odd.recv(100) or "closed")
try:
    socket.create_connection(("127.0.0.1", 18446), timeout=5)
    print("an ungranted port answered")
except OSError as exc:
    print("ungranted port:", type(exc).__name__)
"""


@pytest.mark.parametrize("agent", ["web", "web-gvisor"])
def test_the_runners_loopback_ports_are_no_way_around_the_gateway(
    executor: Executor, store: Store, upstreams: Upstreams, agent: str
) -> None:
    """Every name resolves to loopback, but only the grant's TLS ports answer there, and
    only to a TLS ClientHello naming a host: plain text, or a server name that is no host
    name, is cut before anything reaches the gateway."""
    if agent == "web-gvisor" and "runsc" not in executor.runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    task_id = str(uuid.uuid4())
    state = executor.execute(task_id, {"agent": agent, "command": ["python3", "-c", BYPASS_PROBE]})
    logs = "".join(text for _, text in store.iter_logs(task_id))
    assert state is S.SUCCEEDED, (store.get(task_id)["reason"], logs)
    assert "resolved 127.0.0.1" in logs, logs
    assert "plain text on a TLS port: closed" in logs, logs
    assert "a server name that is no host name: closed" in logs, logs
    assert 'server name "not_a.host" is not a host name' in logs, logs  # said by the runner
    assert "ungranted port: ConnectionRefusedError" in logs, logs
    executor.credentials.audit.flush()
    records = AuditLog(store).records(task_id)
    assert not [r for r in records if r["decision"] == "allow"], records
    assert not [r for r in records if "not_a" in str(r.get("host"))], records  # never sent on


@contextlib.contextmanager
def resolving(executor: Executor, *answers: str) -> Iterator[list[str]]:
    """The gateway's loop resolves rebind.test to `answers`, one per lookup (other names as
    usual); yields the lookups of rebind.test made meanwhile."""
    loop = executor.credentials.endpoints.server._loop  # type: ignore[attr-defined]
    left = iter(answers)
    asked: list[str] = []
    real = loop.getaddrinfo

    async def stub(host: str, port: int, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return await real(host, port, **kwargs)
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(left), port))]

    loop.getaddrinfo = stub
    try:
        yield asked
    finally:
        loop.getaddrinfo = real


def test_the_gateway_resolves_once_and_connects_to_what_it_checked(
    executor: Executor, task: LiveTask, upstreams: Upstreams
) -> None:
    """DNS rebinding: a second lookup would say 127.0.0.2; the gateway never makes one."""
    with resolving(executor, "127.0.0.1", "127.0.0.2", "127.0.0.2") as asked:
        status, _, body = exchange(
            task.socket, get(f"http://rebind.test:{HTTP_PORT}/api/x", task.jwt)
        )
    assert status == 200 and json.loads(body)["path"] == "/api/x"  # nothing listens on .2
    assert asked == ["rebind.test"]


def test_a_connection_resolves_a_name_once_and_checks_its_addresses_every_time(
    executor: Executor, task: LiveTask, upstreams: Upstreams
) -> None:
    """Keep-alive requests to one name on one connection: one lookup between them (no
    resolver round trip per request), each request still decided and answered; a new
    connection looks the name up again, and what it gets now (an internal address no grant
    reaches without `internal`, here a metadata one) is refused."""
    url = f"http://rebind.test:{HTTP_PORT}/api/x"
    with resolving(executor, "127.0.0.1", "169.254.169.254") as asked:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(task.socket)
            kept = one_by_one(sock, get(url, task.jwt), get(url, task.jwt))
        status, headers, _ = exchange(task.socket, get(url, task.jwt))
    assert [answer[0] for answer in kept] == [200, 200], kept
    assert asked == ["rebind.test", "rebind.test"]  # once per connection
    assert status == 403 and headers["x-airlock-denied"] == "ssrf"


PROBE = """
import json, socket, sys
try:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(sys.argv[1])
        sock.sendall(b"POST /v1/bootstrap HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    print(json.dumps({"answer": answer.decode(errors="replace")}))
except (ConnectionResetError, BrokenPipeError):  # cut while speaking: no answer either
    print(json.dumps({"answer": ""}))
except OSError as exc:
    print(json.dumps({"error": exc.__class__.__name__}))
"""


@pytest.mark.parametrize("agent", ["tester", "web-gvisor"])
def test_another_local_process_cannot_speak_for_a_task(
    executor: Executor, store: Store, agent: str
) -> None:
    """A running task's endpoint, tried from the host: another uid cannot even open the
    socket; root outside the task's container is refused by the peer check and alarmed."""
    if agent == "web-gvisor" and "runsc" not in executor.runtime.runtimes():
        pytest.skip("runsc is not registered with this Docker engine")
    task_id = str(uuid.uuid4())
    spec = {"agent": agent, "command": ["python3", "-c", "import time; time.sleep(60)"]}
    worker = threading.Thread(target=executor.execute, args=(task_id, spec))
    worker.start()
    try:
        for _ in range(600):
            if running(store, task_id):
                break
            time.sleep(0.05)
        directory = executor.credentials.endpoints.directory(task_id)
        sock = directory / "airlock.sock"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and sock.stat().st_uid == 10001

        def probe(uid: int | None) -> dict[str, str]:
            ran = subprocess.run(
                ["/usr/bin/python3", "-c", PROBE, str(sock)],  # any uid may run it
                capture_output=True,
                text=True,
                timeout=30,
                user=uid,
            )
            return dict(json.loads(ran.stdout))

        assert probe(65534) == {"error": "PermissionError"}  # nobody: not even the socket
        assert probe(None) == {"answer": ""}  # root, on the host: cut without a word
        executor.credentials.audit.flush()
        alarms = [r for r in AuditLog(store).records(task_id, denied=True) if r["rule"] == "peer"]
        assert alarms and "not in the task's container" in alarms[-1]["reason"]
        # The task itself bootstrapped through the same socket: its runner is in there.
        assert store.get(task_id)["state"] == S.RUNNING.value
    finally:
        store.signal(task_id, SIGNAL_CANCEL)
        worker.join(timeout=60)


def running(store: Store, task_id: str) -> bool:
    try:
        return store.get(task_id).get("state") == S.RUNNING.value
    except TaskNotFound:
        return False
