"""Upstream servers the gateway tests send traffic to, on loopback only."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HTTP_PORT, TLS_PORT, PLAIN_CREDENTIALED_PORT = 18080, 18443, 18082
IMPOSTOR_PORT = 18444  # TLS under a certificate nobody trusts (a man in the middle)


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with what it received, so tests can see what the gateway forwarded."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
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
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "upstream.pem", directory / "upstream.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem.decode()


def tls_server(port: int, cert: Path, key: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Echo)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


class Upstreams:
    def __init__(self, directory: Path) -> None:
        cert, key, self.ca_pem = self_signed(directory)
        self.cert, self.key = cert, key
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Echo)
        self.plain = http.server.ThreadingHTTPServer(("127.0.0.1", PLAIN_CREDENTIALED_PORT), Echo)
        self.tls = tls_server(TLS_PORT, cert, key)
        (directory / "impostor").mkdir()
        self.impostor = tls_server(IMPOSTOR_PORT, *self_signed(directory / "impostor")[:2])
        self.servers = (self.http, self.tls, self.plain, self.impostor)
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
