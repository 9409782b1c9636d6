"""Verifying callers' bearer tokens against an OIDC issuer (any issuer, by URL; OpenBao's
identity tokens on the local stack).

The issuer's discovery document names its JWKS; keys are fetched on first use and kept.
A token whose key id is not among them makes the keys be fetched again, at most once per
`refetch_s` (a stream of forged key ids cannot make us hammer the issuer), which is also how
a rotation is picked up. While the issuer is unreachable the keys already fetched keep
working until `keys_max_age_s` after they were fetched; then tokens are refused as the
issuer being unavailable, never accepted unverified. Checked on every token: the algorithm
against an allow-list (never `none`, never an HMAC keyed with a public key), the signature,
`iss`, `aud`, `exp` (required), `nbf` and `iat`, with a small leeway for clock skew.

`verify` may fetch (blocking); an event loop calls it in a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from orchestrator.adapters import http1
from orchestrator.errors import ServiceUnavailable, Unauthenticated

# Asymmetric algorithms only: a verifier holding public keys must never accept a MAC.
ALGORITHMS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA")
FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Caller:
    """A verified caller: who the issuer says it is, and every claim it signed."""

    issuer: str
    subject: str
    claims: dict[str, Any]

    @property
    def name(self) -> str:
        """A readable name: the issuer's `username` or `preferred_username` claim, else `sub`."""
        for claim in ("username", "preferred_username"):
            value = self.claims.get(claim)
            if isinstance(value, str) and value:
                return value
        return self.subject


def fetch_json(url: str) -> dict[str, Any]:
    """GET a JSON document. Raises ServiceUnavailable when it cannot be had."""
    parts = urlsplit(url)
    client = http1.Client(f"{parts.scheme}://{parts.netloc}", timeout=FETCH_TIMEOUT_S)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        answer = client.request("GET", path or "/")
        if answer.status_code != 200:
            raise ServiceUnavailable("oidc issuer", f"{url}: HTTP {answer.status_code}")
        document = answer.json()
    except (OSError, ValueError) as exc:
        raise ServiceUnavailable("oidc issuer", f"{url}: {exc}") from exc
    finally:
        client.close()
    if not isinstance(document, dict):
        raise ServiceUnavailable("oidc issuer", f"{url}: not a JSON object")
    return document


class OidcVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        algorithms: tuple[str, ...] = ALGORITHMS,
        refetch_s: float = 60.0,
        keys_max_age_s: float = 24 * 3600,
        leeway_s: float = 30.0,
        fetch: Callable[[str], dict[str, Any]] = fetch_json,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.algorithms = tuple(a for a in algorithms if a in ALGORITHMS)
        self.refetch_s, self.keys_max_age_s, self.leeway_s = refetch_s, keys_max_age_s, leeway_s
        self._fetch, self._clock = fetch, clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")  # when the keys in hand were fetched
        self._tried_at = float("-inf")  # when a fetch was last tried, whatever came of it
        self._lock = threading.Lock()

    def verify(self, token: str) -> Caller:
        """The caller `token` proves. Raises Unauthenticated naming the check that failed,
        or ServiceUnavailable when no usable keys can be had from the issuer."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed token ({exc})") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in self.algorithms:
            raise Unauthenticated(f"algorithm {algorithm!r} is not accepted")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token names no key id (kid)")
        key = self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"token is not for audience {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"token is not from issuer {self.issuer!r}") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token refused ({exc})") from None
        return Caller(self.issuer, str(claims["sub"]), claims)

    def _key(self, kid: str) -> jwt.PyJWK:
        with self._lock:
            now = self._clock()
            stale = now - self._fetched_at > self.keys_max_age_s
            if (kid not in self._keys or stale) and now - self._tried_at >= self.refetch_s:
                self._tried_at = now
                try:
                    self._keys, self._fetched_at = self._fetch_keys(), now
                except ServiceUnavailable:
                    if now - self._fetched_at > self.keys_max_age_s:
                        raise
            if now - self._fetched_at > self.keys_max_age_s:
                raise ServiceUnavailable("oidc issuer", "its keys could not be fetched again")
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"unknown key id {kid[:64]!r}")
        return key

    def _fetch_keys(self) -> dict[str, jwt.PyJWK]:
        discovery = self._fetch(f"{self.issuer}/.well-known/openid-configuration")
        if str(discovery.get("issuer", "")).rstrip("/") != self.issuer:
            raise ServiceUnavailable("oidc issuer", "discovery names another issuer")
        uri = discovery.get("jwks_uri")
        if not isinstance(uri, str):
            raise ServiceUnavailable("oidc issuer", "discovery names no jwks_uri")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in self._fetch(uri).get("keys") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                continue
            try:
                keys[entry["kid"]] = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key of a type we do not use
        return keys
