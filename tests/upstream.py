"""Upstream servers the gateway tests send traffic to, on loopback only."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.local.upstreams import git_http_backend, write_key
from orchestrator.local.upstreams import tls_server as local_tls_server

HTTP_PORT, TLS_PORT, PLAIN_CREDENTIALED_PORT = 18080, 18443, 18082
IMPOSTOR_PORT = 18444  # TLS under a certificate nobody trusts (a man in the middle)
NAMED_HOST = "upstream.airlock.test"  # the TLS upstream by name (tests resolve it to loopback)


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with what it received, so tests can see what the gateway forwarded."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/api/smuggle"):  # a second answer behind the first
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
            )
            return
        if self.path.startswith("/api/bare-lf"):  # read one way by some parsers, another by others
            self.wfile.write(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
            return
        if self.path.startswith("/big"):
            payload = b"x" * (1 << 20)
        else:
            payload = json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "body": len(body),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def self_signed(directory: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airlock test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName(NAMED_HOST),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(pem)
    write_key(key_path, key)
    return cert_path, key_path, pem.decode()


def tls_server(port: int, cert: Path, key: Path) -> http.server.ThreadingHTTPServer:
    return local_tls_server(port, Echo, cert, key)


class Upstreams:
    def __init__(self, directory: Path) -> None:
        cert, key, self.ca_pem = self_signed(directory)
        self.cert, self.key = cert, key
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Echo)
        self.plain = http.server.ThreadingHTTPServer(("127.0.0.1", PLAIN_CREDENTIALED_PORT), Echo)
        self.tls = tls_server(TLS_PORT, cert, key)
        (directory / "impostor").mkdir()
        self.impostor = tls_server(IMPOSTOR_PORT, *self_signed(directory / "impostor")[:2])
        (directory / "forge").mkdir()
        self.forge = forge(directory / "forge", cert, key)
        self.servers = (self.http, self.tls, self.plain, self.impostor, self.forge)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


# --- a forge: git over smart HTTP and a PEP 503 package index, over HTTPS ------------------
FORGE_PORT = 18445
PROBE_WHEEL = "airlock_probe-1.0-py3-none-any.whl"


def probe_wheel() -> bytes:
    """A real (tiny) wheel: airlock_probe, whose VALUE is "probe"."""
    import base64
    import hashlib
    import io
    import zipfile

    files = {
        "airlock_probe/__init__.py": b'VALUE = "probe"\n',
        "airlock_probe-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: airlock-probe\nVersion: 1.0\n"
        ),
        "airlock_probe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: airlock-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    files["airlock_probe-1.0.dist-info/RECORD"] = (
        record + "airlock_probe-1.0.dist-info/RECORD,,\n"
    ).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return out.getvalue()


def bare_repository(directory: Path) -> Path:
    """repo.git: one commit with a README."""
    import subprocess

    work, bare = directory / "work", directory / "repo.git"
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "HOME": str(directory),
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "README").write_text("cloned through the gateway\n")
    subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "first"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env)
    return directory


class Forge(http.server.BaseHTTPRequestHandler):
    """/git/*: git's smart HTTP (git http-backend); /simple/ and /files/: a package index."""

    protocol_version = "HTTP/1.1"
    root: Path
    wheel: bytes

    def _answer(self) -> None:
        path = self.path.partition("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if path.startswith("/git/"):
            self._git(self.path[len("/git") :], body)
        elif path in ("/simple/", "/simple/airlock-probe/"):
            import hashlib

            digest = hashlib.sha256(self.wheel).hexdigest()
            page = (
                f'<html><body><a href="/files/{PROBE_WHEEL}#sha256={digest}">{PROBE_WHEEL}</a>'
                "</body></html>"
            ).encode()
            self._send(200, "text/html", page)
        elif path == f"/files/{PROBE_WHEEL}":
            self._send(200, "application/octet-stream", self.wheel)
        else:
            self._send(404, "text/plain", b"not here\n")

    do_GET = do_POST = _answer

    def _git(self, path: str, body: bytes) -> None:
        self._send(*git_http_backend(self.root, self.command, path, self.headers, body))

    def _send(self, status: int, kind: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def forge(directory: Path, cert: Path, key: Path) -> http.server.ThreadingHTTPServer:
    handler = type(
        "ForgeHere", (Forge,), {"root": bare_repository(directory), "wheel": probe_wheel()}
    )
    return local_tls_server(FORGE_PORT, handler, cert, key)
