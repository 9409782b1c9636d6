"""Callers' bearer tokens: verified against a real OIDC issuer (OpenBao's identity tokens,
as the local stack issues them), and refused for every way a token can be wrong: forged,
expired, early, for another audience or issuer, `alg: none`, HMAC keyed with the public
key, an unknown key id (fetched again at most once per interval), a rotated key, and an
issuer that went away (cached keys until they age out, then unavailable, never accepted)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.adapters.oidc import OidcVerifier
from orchestrator.adapters.vault.adapter import Vault
from orchestrator.config import Settings
from orchestrator.errors import ServiceUnavailable, Unauthenticated


class Issuer:
    """An OIDC issuer in the session's OpenBao: a userpass user who may mint identity tokens."""

    def __init__(self, vault: Vault, settings: Settings) -> None:
        ns = settings.namespace.replace("_", "-")
        self.vault, self.addr = vault, settings.vault_addr
        self.mount, self.key, self.role = f"userpass-{ns}", f"key-{ns}", f"role-{ns}"
        self.policy, self.audience = f"oidc-{ns}", f"airlock-api-{ns}"
        self.password = uuid.uuid4().hex
        vault.write(f"sys/auth/{self.mount}", {"type": "userpass"})
        mounts = (vault.read("sys/auth") or {}).get("data") or {}
        accessor = mounts[f"{self.mount}/"]["accessor"]
        vault.write(
            f"identity/oidc/key/{self.key}",
            {"algorithm": "ES256", "allowed_client_ids": ["*"], "verification_ttl": "1h"},
        )
        # The placeholder goes in unquoted: OpenBao renders it as a JSON string.
        template = '{"username": {{identity.entity.aliases.%s.name}}}' % accessor
        vault.write(
            f"identity/oidc/role/{self.role}",
            {"key": self.key, "ttl": "5m", "client_id": self.audience, "template": template},
        )
        rule = f'path "identity/oidc/token/{self.role}" {{ capabilities = ["read"] }}'
        vault.write(f"sys/policies/acl/{self.policy}", {"policy": rule})
        vault.write(
            f"auth/{self.mount}/users/alice",
            {"password": self.password, "token_policies": [self.policy]},
        )

    @property
    def url(self) -> str:
        return f"{self.addr}/v1/identity/oidc"

    def token(self) -> str:
        login = self.vault.write(f"auth/{self.mount}/login/alice", {"password": self.password})
        user_token = (login or {})["auth"]["client_token"]
        answer = self.vault.read(f"identity/oidc/token/{self.role}", token=user_token)
        return str((answer or {})["data"]["token"])

    def rotate(self) -> None:
        self.vault.write(f"identity/oidc/key/{self.key}/rotate", {})

    def remove(self) -> None:
        self.vault.delete(f"sys/auth/{self.mount}")
        self.vault.delete(f"identity/oidc/role/{self.role}")
        self.vault.delete(f"identity/oidc/key/{self.key}")
        self.vault.delete(f"sys/policies/acl/{self.policy}")


@pytest.fixture(scope="module")
def issuer(vault: Vault, settings: Settings) -> Iterator[Issuer]:
    made = Issuer(vault, settings)
    yield made
    made.remove()


def test_a_real_issuers_token_proves_its_user(issuer: Issuer) -> None:
    caller = OidcVerifier(issuer.url, issuer.audience).verify(issuer.token())
    assert caller.name == "alice" and caller.issuer == issuer.url
    assert caller.subject and caller.subject != "alice"  # the entity id, not a typed name


def test_another_audience_is_refused(issuer: Issuer) -> None:
    with pytest.raises(Unauthenticated, match="not for audience"):
        OidcVerifier(issuer.url, "someone-else").verify(issuer.token())


def test_a_rotated_key_is_picked_up_and_the_old_one_still_verifies(issuer: Issuer) -> None:
    fetches: list[str] = []

    def counting(url: str) -> dict[str, Any]:
        from orchestrator.adapters.oidc import fetch_json

        fetches.append(url)
        return fetch_json(url)

    verifier = OidcVerifier(issuer.url, issuer.audience, refetch_s=0, fetch=counting)
    before = issuer.token()
    verifier.verify(before)
    issuer.rotate()  # OpenBao publishes the next key ahead: this one is in hand already
    nearly = issuer.token()
    assert verifier.verify(nearly).name == "alice" and len(fetches) == 2
    issuer.rotate()  # a key nobody has seen: its id makes the keys be fetched again
    after = issuer.token()
    kids = {jwt.get_unverified_header(t)["kid"] for t in (before, nearly, after)}
    assert len(kids) == 3
    assert verifier.verify(after).name == "alice"
    assert verifier.verify(before).name == "alice"  # within the old key's verification ttl
    assert len(fetches) == 4  # discovery and keys, at first and once for the new key id


# -- forged tokens, against an issuer of the test's own (a key only the test holds) ---------

ISSUER = "https://issuer.test"
AUDIENCE = "airlock-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Keys:
    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.kid = uuid.uuid4().hex
        self.fetches = 0
        self.up = True

    def jwk(self) -> dict[str, Any]:
        public = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "alg": "ES256", "use": "sig"}

    def fetch(self, url: str) -> dict[str, Any]:
        if not self.up:
            raise ServiceUnavailable("oidc issuer", "connection refused")
        self.fetches += 1
        if url.endswith("openid-configuration"):
            return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"}
        return {"keys": [self.jwk()]}

    def sign(self, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, "ES256", headers={"kid": kid or self.kid})


@pytest.fixture
def keys() -> Keys:
    return Keys()


def verifier(keys: Keys, **options: Any) -> OidcVerifier:
    return OidcVerifier(ISSUER, AUDIENCE, fetch=keys.fetch, **options)


def test_a_good_token(keys: Keys) -> None:
    assert verifier(keys).verify(keys.sign(username="bob")).name == "bob"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
        ({"iat": int(time.time()) + 3600}, "not valid yet"),
        ({"aud": "another-api"}, "not for audience"),
        ({"iss": "https://evil.test"}, "not from issuer"),
        ({"exp": None}, 'missing the "exp" claim'),
        ({"sub": None}, 'missing the "sub" claim'),
    ],
)
def test_wrong_claims_are_refused(keys: Keys, claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        verifier(keys).verify(keys.sign(**claims))


def test_forgeries_are_refused(keys: Keys) -> None:
    check = verifier(keys)
    good = keys.sign()
    head, body, _ = good.split(".")
    unsigned = jwt.encode(jwt.decode(good, options={"verify_signature": False}), None, "none")
    with pytest.raises(Unauthenticated, match="algorithm 'none' is not accepted"):
        check.verify(unsigned)
    public_pem = keys.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac_head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": keys.kid}).encode())
    signed = f"{mac_head}.{body}".encode()
    mac = f"{mac_head}.{body}." + b64(hmac.new(public_pem, signed, hashlib.sha256).digest())
    with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not accepted"):
        check.verify(mac)  # HMAC keyed with the issuer's public key
    other = Keys()
    with pytest.raises(Unauthenticated, match="token refused"):
        check.verify(other.sign(kid=keys.kid))  # another key, claiming ours
    tampered = f"{head}.{body[:-4]}AAAA.{good.split('.')[2]}"
    with pytest.raises(Unauthenticated):
        check.verify(tampered)
    for garbage in ("", "abc", "a.b.c", "Bearer " + good):
        with pytest.raises(Unauthenticated, match="malformed token"):
            check.verify(garbage)


def test_unknown_key_ids_fetch_at_most_once_per_interval(keys: Keys) -> None:
    now = [1000.0]
    check = verifier(keys, refetch_s=60, clock=lambda: now[0])
    check.verify(keys.sign())
    assert keys.fetches == 2  # discovery and keys
    now[0] += 61
    for _ in range(50):
        with pytest.raises(Unauthenticated, match="unknown key id"):
            check.verify(keys.sign(kid=uuid.uuid4().hex))
    assert keys.fetches == 4  # once more for the first unknown id, then not within a minute
    assert check.verify(keys.sign()).subject == "user-1"  # known ids need no fetch
    now[0] += 61
    with pytest.raises(Unauthenticated, match="unknown key id"):
        check.verify(keys.sign(kid=uuid.uuid4().hex))
    assert keys.fetches == 6


def test_an_unreachable_issuer_keeps_cached_keys_until_they_age_out(keys: Keys) -> None:
    now = [1000.0]
    check = verifier(keys, refetch_s=60, keys_max_age_s=3600, clock=lambda: now[0])
    check.verify(keys.sign())
    keys.up = False
    now[0] += 1800
    assert check.verify(keys.sign()).subject == "user-1"  # the keys in hand still serve
    with pytest.raises(Unauthenticated, match="unknown key id"):
        check.verify(keys.sign(kid="rotated"))  # a refetch was tried and failed: no new key
    now[0] += 1801
    with pytest.raises(ServiceUnavailable, match="oidc issuer"):
        check.verify(keys.sign())  # aged out and not renewable: unavailable, never accepted
    keys.up = True
    now[0] += 61
    assert check.verify(keys.sign()).subject == "user-1"


def test_a_first_fetch_that_fails_refuses_as_unavailable(keys: Keys) -> None:
    keys.up = False
    with pytest.raises(ServiceUnavailable):
        verifier(keys).verify(keys.sign())
