"""The local stack's upstreams: real services for agents to reach through the gateway on a
machine with no internet, on loopback, over HTTPS, under names a resolver entry maps to
127.0.0.1 (bootstrap adds it to /etc/hosts):

    https://docs.airlock.test:9443/         a reference site
    https://pypi.airlock.test:9444/simple/  a PEP 503 package index of real wheels
    https://git.airlock.test:9445/          git over smart HTTP (git http-backend); a push
                                            needs the forge token, to agent/* branches only
    https://mcp.airlock.test:9446/mcp       an MCP server (streamable HTTP, the official SDK)

Their certificates come from a local CA made here; the gateway trusts it through
AIRLOCK_UPSTREAM_CA_FILE, and no task ever sees it (tasks trust the gateway's CA only).
`airlock dev upstreams` serves them in the foreground; bootstrap runs it in the background.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import html
import http.server
import os
import re
import secrets
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ADDRESS = "127.0.0.1"
DOCS, INDEX, FORGE, TOOLS = (
    "docs.airlock.test",
    "pypi.airlock.test",
    "git.airlock.test",
    "mcp.airlock.test",
)
PORTS = {DOCS: 9443, INDEX: 9444, FORGE: 9445, TOOLS: 9446}
HOSTS_MARK = "# airlock local upstreams"
DEMO_REPOSITORY = "demo/calculator.git"
PUSHABLE = "refs/heads/agent/"  # the forge takes pushes to agent/* branches only
# Where the forge's token lives in Vault: the coder's git token, which the gateway injects.
FORGE_SECRET = "secret/data/agents/coder/git"


def hosts_line() -> str:
    """The resolver entry: every local upstream's name on loopback."""
    return f"{ADDRESS} {' '.join(PORTS)} {HOSTS_MARK}"


class Layout:
    """Where the local upstreams keep their state (bootstrap: $SERVICES/upstreams)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca, self.ca_key = root / "ca.pem", root / "ca.key"
        self.leaf, self.leaf_key = root / "leaf.pem", root / "leaf.key"
        self.wheels, self.git = root / "wheels", root / "git"
        self.forge_token = root / "forge.token"


# --- certificates -------------------------------------------------------------------------
def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A private key as PEM, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _valid_for(path: Path, days: int) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=days)


def ensure_certificates(layout: Layout) -> None:
    """A local CA (a year) and a leaf for every upstream name (ninety days), renewed when
    they near their end."""
    layout.root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    if not (_valid_for(layout.ca, 30) and layout.ca_key.exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Airlock local upstreams CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_key(layout.ca_key, key)
        layout.ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        layout.leaf.unlink(missing_ok=True)
    if not (_valid_for(layout.leaf, 7) and layout.leaf_key.exists()):
        ca = x509.load_pem_x509_certificate(layout.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOCS)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in PORTS]), False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write_key(layout.leaf_key, key)
        layout.leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_forge_token(layout: Layout) -> str:
    """The token a push to the forge needs (the gateway injects it; no task holds it)."""
    if not layout.forge_token.exists():
        fd = os.open(layout.forge_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("forge-" + secrets.token_urlsafe(24))
    return layout.forge_token.read_text().strip()


# --- the demo repository ------------------------------------------------------------------
CALCULATOR = {
    "README.md": "# calculator\n\nA tiny library with tests: `python -m pytest`.\n",
    "calculator.py": (
        '"""Arithmetic for the demo."""\n\n\ndef add(a, b):\n    return a + b\n\n\n'
        "def mean(values):\n    return sum(values) / len(values)\n"
    ),
    "test_calculator.py": (
        "from calculator import add, mean\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
        "def test_mean():\n    assert mean([1, 2, 3, 4]) == 2.5\n"
    ),
}
PRE_RECEIVE = f"""#!/bin/sh
# Pushes land on agent branches only: main is for people.
while read old new ref; do
  case "$ref" in
    {PUSHABLE}*) ;;
    *) echo "refused: $ref (agents push to agent/* branches only)"; exit 1 ;;
  esac
done
"""


def _git(*args: str, cwd: Path | None = None) -> None:
    env = {
        "GIT_AUTHOR_NAME": "Airlock",
        "GIT_AUTHOR_EMAIL": "airlock@airlock.test",
        "GIT_COMMITTER_NAME": "Airlock",
        "GIT_COMMITTER_EMAIL": "airlock@airlock.test",
        "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
        "HOME": "/nonexistent",
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def ensure_repository(layout: Layout) -> Path:
    """demo/calculator.git: a small Python project with tests, pushable to agent/*."""
    bare = layout.git / DEMO_REPOSITORY
    if (bare / "HEAD").exists():
        return bare
    work = layout.git / ".seed"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    _git("init", "-q", "-b", "main", str(work))
    for name, text in CALCULATOR.items():
        (work / name).write_text(text)
    _git("add", ".", cwd=work)
    _git("commit", "-qm", "calculator: add and mean, with tests", cwd=work)
    bare.parent.mkdir(parents=True, exist_ok=True)
    _git("clone", "-q", "--bare", str(work), str(bare))
    _git("-C", str(bare), "config", "http.receivepack", "true")
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(PRE_RECEIVE)
    hook.chmod(0o755)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return bare


# --- the servers --------------------------------------------------------------------------
PAGES = {
    "/": (
        "Airlock reference",
        "<p>Reference notes on running AI agents as sandboxed workloads.</p><ul>"
        '<li><a href="/sandboxing.html">Sandboxing a task</a></li>'
        '<li><a href="/egress.html">Egress through a gateway</a></li>'
        '<li><a href="/credentials.html">Short-lived credentials</a></li></ul>',
    ),
    "/sandboxing.html": (
        "Sandboxing a task",
        "<p>Each task runs in its own container: no network but loopback, a read-only root, "
        "no capabilities, an unprivileged user, and hard limits on memory, CPU and processes. "
        "The container and everything it was given end with the task.</p>",
    ),
    "/egress.html": (
        "Egress through a gateway",
        "<p>A task reaches the outside only through the gateway, which decides every request "
        "against the agent's rules (host, port, method, path, MCP tool) and logs each "
        "decision with the task's identity.</p>",
    ),
    "/credentials.html": (
        "Short-lived credentials",
        "<p>A task gets a token scoped to itself and secrets that expire with it; where a "
        "rule injects a credential, the task holds only a placeholder.</p>",
    ),
}


def _page(title: str, body: str) -> bytes:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
        f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    ).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "airlock-local"

    def send(self, status: int, kind: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, format: str, *args: Any) -> None:
        host = self.headers.get("Host", "-") if getattr(self, "headers", None) else "-"
        print(f"{host} {format % args}", flush=True)


class Docs(_Handler):
    def do_GET(self) -> None:
        found = PAGES.get(self.path.partition("?")[0])
        if found is None:
            self.send(404, "text/html", _page("Not found", "<p>No such page.</p>"))
        else:
            self.send(200, "text/html; charset=utf-8", _page(*found))

    do_HEAD = do_GET


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Index(_Handler):
    """PEP 503: /simple/ lists projects, /simple/<name>/ their files (with sha256)."""

    wheels: Path

    def _files(self) -> dict[str, list[Path]]:
        projects: dict[str, list[Path]] = {}
        for wheel in sorted(self.wheels.glob("*.whl")):
            projects.setdefault(_normalized(wheel.name.split("-")[0]), []).append(wheel)
        return projects

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        projects = self._files()
        if path == "/simple/":
            links = "".join(f'<a href="/simple/{p}/">{p}</a><br>' for p in sorted(projects))
            self.send(200, "text/html", _page("Simple index", links))
        elif (match := re.fullmatch(r"/simple/([a-z0-9-]+)/", path)) and match[1] in projects:
            links = "".join(
                f'<a href="/files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                f"{w.name}</a><br>"
                for w in projects[match[1]]
            )
            self.send(200, "text/html", _page(f"Links for {match[1]}", links))
        elif (match := re.fullmatch(r"/files/([A-Za-z0-9_.+-]+\.whl)", path)) and (
            self.wheels / match[1]
        ).is_file():
            self.send(200, "application/octet-stream", (self.wheels / match[1]).read_bytes())
        else:
            self.send(404, "text/plain", b"not found\n")

    do_HEAD = do_GET


def git_http_backend(
    root: Path, method: str, path: str, headers: Any, body: bytes, user: str | None = None
) -> tuple[int, str, bytes]:
    """One request to `git http-backend` (CGI) over the repositories under `root`; pushes
    (receive-pack) are served only when `user` names who is pushing."""
    path_info, _, query = path.partition("?")
    env = {
        "GIT_PROJECT_ROOT": str(root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "REQUEST_METHOD": method,
        "CONTENT_TYPE": headers.get("Content-Type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_CONTENT_ENCODING": headers.get("Content-Encoding", ""),
        "GIT_PROTOCOL": headers.get("Git-Protocol", ""),
        "REMOTE_ADDR": ADDRESS,
        "PATH": "/usr/bin:/bin",
        **({"REMOTE_USER": user} if user else {}),
    }
    out = subprocess.run(
        ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
    ).stdout
    head, found, payload = out.partition(b"\r\n\r\n")
    if not found:
        head, _, payload = out.partition(b"\n\n")
    status, kind = 200, "application/octet-stream"
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        elif name.lower() == "content-type":
            kind = value.strip()
    return status, kind, payload


class Forge(_Handler):
    """git smart HTTP. Reading is open; a push needs `Authorization: Bearer <forge token>`."""

    root: Path
    token: str

    def _answer(self) -> None:
        body = self.body()
        pushing = "git-receive-pack" in self.path
        offered = self.headers.get("Authorization", "")
        user = None
        if hmac.compare_digest(offered.encode(), f"Bearer {self.token}".encode()):
            user = "coder"
        if pushing and user is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="git.airlock.test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send(*git_http_backend(self.root, self.command, self.path, self.headers, body, user))

    do_GET = do_POST = _answer


def tls_server(
    port: int, handler: type[http.server.BaseHTTPRequestHandler], cert: Path, key: Path
) -> http.server.ThreadingHTTPServer:
    """`handler` over HTTPS on loopback:`port`, with this certificate and key."""
    server = http.server.ThreadingHTTPServer((ADDRESS, port), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def mcp_app() -> Any:
    """The MCP server: one tool an agent may be granted, one it must never get."""
    from mcp.server.mcpserver import MCPServer  # the SDK is a dev dependency, needed here only
    from mcp.server.transport_security import TransportSecuritySettings

    server = MCPServer("airlock-local-tools")
    issues = {
        1: "calculator: mean() of an empty list raises ZeroDivisionError",
        2: "calculator: add a median() function",
    }

    @server.tool()
    def lookup_issue(number: int) -> str:
        """Read an issue of the demo repository."""
        return issues.get(number, f"no issue #{number}")

    @server.tool()
    def delete_repository(name: str) -> str:
        """Delete a repository on the forge (no agent should ever be granted this)."""
        return f"deleted {name}"

    hosts = [f"{TOOLS}:{PORTS[TOOLS]}", f"{ADDRESS}:{PORTS[TOOLS]}"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"https://{host}" for host in hosts],
    )
    return server.streamable_http_app(transport_security=security)


def serve(layout: Layout) -> None:
    """Serve every local upstream until interrupted."""
    import uvicorn  # with the API's dependencies; only this long-running command needs it

    ensure_certificates(layout)
    token = ensure_forge_token(layout)
    ensure_repository(layout)
    layout.wheels.mkdir(parents=True, exist_ok=True)
    handlers: dict[str, type[http.server.BaseHTTPRequestHandler]] = {
        DOCS: Docs,
        INDEX: type("IndexHere", (Index,), {"wheels": layout.wheels}),
        FORGE: type("ForgeHere", (Forge,), {"root": layout.git, "token": token}),
    }
    servers = [
        tls_server(PORTS[name], handler, layout.leaf, layout.leaf_key)
        for name, handler in handlers.items()
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"serving {', '.join(f'https://{n}:{p}' for n, p in PORTS.items())}", flush=True)
    try:
        uvicorn.run(
            mcp_app(),
            host=ADDRESS,
            port=PORTS[TOOLS],
            ssl_certfile=str(layout.leaf),
            ssl_keyfile=str(layout.leaf_key),
            log_level="warning",
        )
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
