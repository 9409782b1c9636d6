"""Task JWTs: minted per task, signed by Vault (transit), verifiable offline from a JWKS.

The signing key never leaves Vault. The JWKS is derived from the transit key's public
versions, so rotating the key in Vault rotates the JWKS; a verifier that meets an unknown
`kid` refetches once. A token is valid only while its task is live: verification takes a
liveness check, so a task's JWT dies with the task even before it expires.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from orchestrator.adapters.vault.adapter import Vault
from orchestrator.adapters.vault.setup import JWT_KEY
from orchestrator.core.grant import Grant
from orchestrator.errors import AirlockError

ALGORITHM = "ES256"
KEY_CACHE_S = 60.0


class InvalidToken(AirlockError):
    """A task JWT failed verification; the message says which check."""

    exit_code = 2


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes(32, "big"))


def jwks_from_transit(key: dict[str, Any], name: str = JWT_KEY) -> dict[str, Any]:
    """The JWKS of every version of a transit ECDSA P-256 key still able to verify."""
    keys = []
    oldest = int(key.get("min_decryption_version") or 1)
    for version, info in sorted(key.get("keys", {}).items(), key=lambda kv: int(kv[0])):
        if int(version) < oldest:
            continue
        public = load_pem_public_key(info["public_key"].encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        numbers = public.public_numbers()
        keys.append(
            {
                "kty": "EC",
                "crv": "P-256",
                "alg": ALGORITHM,
                "use": "sig",
                "kid": f"{name}:v{version}",
                "x": _int_b64(numbers.x),
                "y": _int_b64(numbers.y),
            }
        )
    return {"keys": keys}


def transit_jwks(vault: Vault, name: str = JWT_KEY) -> dict[str, Any]:
    """The JWKS of the transit key that signs task JWTs, read from Vault now."""
    key = (vault.read(f"transit/keys/{name}") or {}).get("data", {})
    return jwks_from_transit(key, name)


def fetch_jwks_url(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """A JWKS document from a URL (how a verifier outside Airlock gets the keys)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        document = json.loads(response.read(1 << 20))
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise InvalidToken(f"{url} did not return a JWKS")
    return document


class JwksServer:
    """Serves the JWKS at /.well-known/jwks.json, fresh from Vault on every request."""

    def __init__(self, jwks: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        source = jwks

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                body = json.dumps(source()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "max-age=60")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/.well-known/jwks.json"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> JwksServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="jwks").start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass(frozen=True)
class TaskToken:
    jwt: str
    jti: str
    expires_at: float
    claims: dict[str, Any]


class Minter:
    """Mints task JWTs by asking Vault's transit engine to sign them."""

    def __init__(
        self,
        vault: Vault,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
        key: str = JWT_KEY,
    ) -> None:
        self.vault = vault
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self._version: tuple[int, float] | None = None
        self._lock = threading.Lock()

    def _key_version(self) -> int:
        """The key version to sign with, re-read from Vault at most once a minute."""
        with self._lock:
            now = time.monotonic()
            if self._version is None or now - self._version[1] > KEY_CACHE_S:
                key = self.vault.read(f"transit/keys/{self.key}") or {}
                self._version = (int(key["data"]["latest_version"]), now)
            return self._version[0]

    def mint(
        self,
        task_id: str,
        grant: Grant,
        grant_hash: str,
        deadline: float,
        jti: str | None = None,
        submitter: str | None = None,
        audience: str | None = None,
        token: str | None = None,
    ) -> TaskToken:
        """A task JWT in the shape of RFC 8693: `sub` is the user when the agent acts for one
        (else the agent's identity); `act` names the agent and, nested, the submitting
        caller when that is not the user; `submitter` names who submitted (kind:name).
        `aud` is the gateway's unless `audience` names one upstream's. Signed with `token`
        (the task's minting token) where given, else this client's own."""
        now = int(self.clock())
        version = self._key_version()
        jti = jti or str(uuid.uuid4())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.on_behalf_of or grant.identity,
            "aud": audience or self.audience,
            "iat": now,
            "nbf": now,
            "exp": int(deadline),
            "jti": jti,
            "task_id": task_id,
            "agent": grant.agent,
            "grant_hash": grant_hash,
        }
        if submitter:
            claims["submitter"] = submitter
        if grant.on_behalf_of:
            actor: dict[str, Any] = {"sub": grant.identity}
            if submitter and submitter != f"user:{grant.on_behalf_of}":
                actor["act"] = {"sub": submitter}
            claims["act"] = actor
        header = {"alg": ALGORITHM, "typ": "JWT", "kid": f"{self.key}:v{version}"}
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signed = (
            self.vault.write(
                f"transit/sign/{self.key}",
                {
                    "input": base64.b64encode(signing_input.encode()).decode(),
                    "key_version": version,
                    "hash_algorithm": "sha2-256",
                    "marshaling_algorithm": "jws",
                },
                token=token,
            )
            or {}
        )
        signature = str(signed["data"]["signature"]).split(":", 2)[2]
        return TaskToken(f"{signing_input}.{signature}", jti, float(claims["exp"]), claims)


class Verifier:
    """Checks task JWTs offline against a JWKS; refetches the JWKS when it meets a new kid."""

    def __init__(
        self,
        fetch_jwks: Callable[[], dict[str, Any]],
        audience: str,
        issuer: str,
        is_live: Callable[[str, str], bool],
        leeway_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fetch_jwks = fetch_jwks
        self.audience, self.issuer = audience, issuer
        self.is_live = is_live
        self.leeway_s = leeway_s
        self.clock = clock
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}

    def _refresh(self) -> None:
        keys = {}
        for jwk in self.fetch_jwks().get("keys", []):
            if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
                x = int.from_bytes(b64url_decode(jwk["x"]), "big")
                y = int.from_bytes(b64url_decode(jwk["y"]), "big")
                keys[jwk["kid"]] = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        self._keys = keys

    def _key(self, kid: str) -> ec.EllipticCurvePublicKey:
        if kid not in self._keys:
            self._refresh()  # a rotated key: fetch the JWKS again, once
        if kid not in self._keys:
            raise InvalidToken(f"unknown signing key {kid!r}")
        return self._keys[kid]

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid, live task token. Raises InvalidToken saying why not."""
        try:
            head_b64, body_b64, sig_b64 = token.split(".")
            header = json.loads(b64url_decode(head_b64))
            claims = json.loads(b64url_decode(body_b64))
            signature = b64url_decode(sig_b64)
        except ValueError:
            raise InvalidToken("malformed token") from None
        if header.get("alg") != ALGORITHM or len(signature) != 64:
            raise InvalidToken("unsupported algorithm")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._key(str(header.get("kid"))).verify(
                der, f"{head_b64}.{body_b64}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise InvalidToken("bad signature") from None
        self._check_claims(claims)
        return dict(claims)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = self.clock()
        audiences = claims.get("aud")
        audiences = audiences if isinstance(audiences, list) else [audiences]
        if self.audience not in audiences:
            raise InvalidToken("wrong audience")
        if claims.get("iss") != self.issuer:
            raise InvalidToken("wrong issuer")
        if not isinstance(claims.get("exp"), int) or now > claims["exp"] + self.leeway_s:
            raise InvalidToken("expired")
        if isinstance(claims.get("nbf"), int) and now + self.leeway_s < claims["nbf"]:
            raise InvalidToken("not yet valid")
        if not self.is_live(str(claims.get("task_id")), str(claims.get("jti"))):
            raise InvalidToken("task is no longer live")
