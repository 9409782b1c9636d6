"""The small HTTP/1.1 client: against the real engine and Vault, and against a loopback
server that answers each request with a scripted reply (chunks, closes, garbage)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.adapters import http1
from orchestrator.config import Settings


class Scripted:
    """A loopback server: each accepted connection serves replies[i] for its i-th request."""

    def __init__(self, replies: list[list[bytes]], unix: Path | None = None) -> None:
        family = socket.AF_UNIX if unix else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(str(unix) if unix else ("127.0.0.1", 0))
        self.listener.listen(8)
        self.replies = replies
        self.requests: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        name = self.listener.getsockname()
        return f"unix://{name}" if isinstance(name, str) else f"http://127.0.0.1:{name[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            script = self.replies[self.connections]
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn, script), daemon=True).start()

    def _answer(self, conn: socket.socket, script: list[bytes]) -> None:
        with conn:
            for reply in script:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                if reply:
                    conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(*replies: list[bytes], unix: Path | None = None) -> Scripted:
        server = Scripted(list(replies), unix)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


OK_JSON = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"a": true}'
)


def test_keep_alive_json_and_chunks(scripted: Callable[..., Scripted]) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"b"\r\n6\r\n: [1]}\r\n0\r\nTrailer: x\r\n\r\n'
    )
    server = scripted([OK_JSON, chunked, b"HTTP/1.1 204 No Content\r\n\r\n"])
    client = http1.Client(server.url)
    first = client.request("POST", "/x", {"k": "v"}, {"X-Token": "t"})
    assert first.status_code == 200 and first.json() == {"a": True}
    assert first.headers["content-type"] == first.headers.get("Content-Type")
    assert client.request("GET", "/y").json() == {"b": [1]}
    assert client.request("DELETE", "/z").status_code == 204
    assert server.connections == 1  # all three on one kept-alive connection
    sent = server.requests[0]
    assert sent.startswith(b"POST /x HTTP/1.1\r\n") and b"X-Token: t\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"k":"v"}') and b"Content-Length: 9\r\n" in sent
    client.close()


def test_a_connection_the_server_closed_is_replaced(scripted: Callable[..., Scripted]) -> None:
    """The server answers once and hangs up; the next request goes on a new connection."""
    server = scripted([OK_JSON], [OK_JSON])
    client = http1.Client(server.url)
    assert client.request("GET", "/1").ok
    assert client.request("GET", "/2").ok
    assert server.connections == 2 and len(server.requests) == 2


def test_connection_close_and_unsized_bodies(scripted: Callable[..., Scripted]) -> None:
    server = scripted(
        [b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno"],
        [b"HTTP/1.0 200 OK\r\n\r\nuntil the end"],
    )
    client = http1.Client(server.url)
    failed = client.request("GET", "/a")
    assert (failed.status_code, failed.reason, failed.text, failed.ok) == (500, "Oops", "no", False)
    assert client.request("GET", "/b").content == b"until the end"  # read to the close
    assert server.connections == 2


def test_garbage_and_cut_answers_are_protocol_errors(scripted: Callable[..., Scripted]) -> None:
    server = scripted(
        [b"SSH-2.0-OpenSSH\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
    )
    client = http1.Client(server.url)
    for _ in range(2):
        with pytest.raises(http1.ProtocolError):
            client.request("GET", "/")
    with pytest.raises(http1.ProtocolError, match="chunk"):
        client.request("GET", "/")


def test_nothing_listening_raises_what_connect_raised(tmp_path: Path) -> None:
    """The ride-out logic relies on it: these errors mean the request was never sent."""
    with pytest.raises(FileNotFoundError):
        http1.Client(f"unix://{tmp_path}/none.sock").request("GET", "/")
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        http1.Client(f"http://127.0.0.1:{port}").request("GET", "/")


def test_over_a_unix_socket(scripted: Callable[..., Scripted], tmp_path: Path) -> None:
    server = scripted([OK_JSON], unix=tmp_path / "s.sock")
    assert http1.Client(server.url).request("GET", "/").json() == {"a": True}
    assert server.requests[0].startswith(b"GET / HTTP/1.1\r\nHost: localhost\r\n")


def test_unsupported_addresses() -> None:
    for url in ("ssh://user@host", "npipe:////./pipe/docker_engine", "ftp://x"):
        with pytest.raises(ValueError, match="unsupported address"):
            http1.Client(url)


def test_the_real_engine_and_vault(settings: Settings) -> None:
    engine = http1.Client(settings.docker_host or "unix:///var/run/docker.sock")
    version = engine.request("GET", "/version").json()
    assert version["ApiVersion"] and engine.request("GET", "/_ping").text == "OK"
    missing = engine.request("POST", "/containers/airlock-no-such-container/start")
    assert missing.status_code == 404 and "No such container" in missing.json()["message"]
    vault = http1.Session(settings.vault_addr)
    health = vault.request("GET", f"{settings.vault_addr}/v1/sys/health")
    assert health.status_code == 200 and health.json()["sealed"] is False
    with pytest.raises(ValueError, match="is not on"):
        vault.request("GET", "http://elsewhere:8200/v1/sys/health")


def test_upgrade_hands_over_the_raw_stream(scripted: Callable[..., Scripted]) -> None:
    upgraded = b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\nConnection: Upgrade\r\n\r\nraw bytes"
    refused = b'HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\n\r\n{"message": "gone!"}'
    server = scripted([upgraded], [refused])
    client = http1.Client(server.url)
    answer, stream = client.upgrade("POST", "/attach")
    assert answer.status_code == 101 and stream is not None
    assert stream.reader.read() == b"raw bytes"  # bytes after the head come with it
    stream.close()
    assert b"Connection: Upgrade\r\nUpgrade: tcp\r\n" in server.requests[0]
    answer, stream = client.upgrade("POST", "/attach")
    assert stream is None and answer.status_code == 404 and answer.json() == {"message": "gone!"}


def test_vault_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An https:// Vault, reached through http1 with Vault's own TLS variables; a client
    that does not trust its CA is refused, and says so as Vault being unreachable."""
    import subprocess
    import sys
    import time

    from orchestrator.adapters.vault.adapter import Vault
    from orchestrator.errors import ServiceUnavailable

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "bao"),
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={tmp_path}",
            "-dev-root-token-id=tls-test-root",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        addr = f"https://127.0.0.1:{port}"
        for _ in range(100):  # the server writes its CA when it starts
            if list(tmp_path.glob("*ca.pem")):
                break
            time.sleep(0.1)
        (ca,) = tmp_path.glob("*ca.pem")
        untrusting = Vault(addr, "tls-test-root")  # the system's roots: not this CA
        monkeypatch.setenv("VAULT_CACERT", str(ca))
        vault = Vault(addr, "tls-test-root")
        for _ in range(100):
            try:
                vault.ping()
                break
            except ServiceUnavailable:
                time.sleep(0.1)
        assert vault.read("auth/token/lookup-self")["data"]["id"] == "tls-test-root"  # type: ignore[index]
        with pytest.raises(ServiceUnavailable, match="SSL"):
            untrusting.ping()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_vault_tls_settings_that_cannot_be_read(tmp_path: Path) -> None:
    from orchestrator.config import vault_tls
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="Vault TLS settings"):
        vault_tls({"VAULT_CACERT": str(tmp_path / "missing.pem")})
    assert vault_tls({}).verify_mode.name == "CERT_REQUIRED"


def redirect(status: int, location: str) -> bytes:
    return (
        f"HTTP/1.1 {status} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
    )


def test_a_standby_redirect_is_followed_not_read_as_success(
    scripted: Callable[..., Scripted],
) -> None:
    """A Vault standby answers 307 with the active node's address: the call goes there, with
    its method, body and token, instead of reading the empty 307 as a successful answer."""
    active = scripted([OK_JSON])
    standby = scripted([redirect(307, f"{active.url}/v1/auth/token/create")])
    session = http1.Session(standby.url)
    answer = session.request(
        "POST", f"{standby.url}/v1/auth/token/create", {"X-Vault-Token": "t"}, {"ttl": "1m"}
    )
    assert answer.status_code == 200 and answer.json() == {"a": True}
    assert answer.url == f"{active.url}/v1/auth/token/create"
    sent = active.requests[0]
    assert sent.startswith(b"POST /v1/auth/token/create HTTP/1.1\r\n")
    assert b"X-Vault-Token: t\r\n" in sent and sent.endswith(b'{"ttl":"1m"}')


def test_redirects_as_requests_follows_them(scripted: Callable[..., Scripted]) -> None:
    target = scripted([OK_JSON, OK_JSON])
    server = scripted([redirect(303, f"{target.url}/done"), redirect(307, "/again")])
    session = http1.Session(server.url)
    assert session.request("POST", f"{server.url}/form", json={"k": 1}).ok
    assert target.requests[0].startswith(b"GET /done HTTP/1.1\r\n")  # 303: GET, no body
    # not followed when the caller says so
    held = session.request("GET", f"{server.url}/x", allow_redirects=False)
    assert held.status_code == 307 and held.headers["location"] == "/again"


def test_a_redirect_loop_ends(scripted: Callable[..., Scripted]) -> None:
    loop = scripted([redirect(302, "/a")] * 10)
    with pytest.raises(http1.ProtocolError, match="more than 5 redirects"):
        http1.Session(loop.url).request("GET", f"{loop.url}/a")
    assert len(loop.requests) == 6


def test_answers_are_capped(scripted: Callable[..., Scripted]) -> None:
    big = b"x" * 2000
    server = scripted(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + big],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + big + b"\r\n0\r\n\r\n"],
        [OK_JSON],
    )
    client = http1.Client(server.url, max_body=1000)
    for _ in range(2):
        with pytest.raises(http1.ProtocolError, match="over 1000 bytes"):
            client.request("GET", "/big")
    assert client.request("GET", "/small").json() == {"a": True}  # on a new connection
    assert server.connections == 3
