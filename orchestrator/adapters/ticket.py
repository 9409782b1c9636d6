"""Admission tickets: what makes a queue message one the front door sent.

Every `airlock.run` message carries a ticket, a JWS (EdDSA, Ed25519) signed with the front
door's key, that binds the task id, a digest of the exact spec, the queue, the verified
submitter and the proven user. A worker holds only the public key: a message without a
ticket, with one signed by another key, or whose spec, id or queue differs from what was
signed, is refused before anything is recorded or started. Tickets expire (a replay of an
old message after its record has expired finds nothing to run).

The worker presents the ticket to Vault (a JWT auth method that trusts the same public key)
to mint the task's Vault token and sign its JWTs: its own Vault policy can do neither, so it
mints only for tasks the front door admitted, and only as the agent each ticket names.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from orchestrator.core.caller import Identities, Principal
from orchestrator.errors import ConfigError

ALGORITHM = "EdDSA"
ISSUER = "airlock-front-door"
TICKET_TTL_S = 24 * 3600


class InvalidTicket(Exception):
    """A message whose ticket does not hold: the reason says which check failed."""


def spec_digest(spec: Any) -> str:
    """The digest a ticket binds: SHA-256 of the spec's canonical JSON."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def generate(private_path: Path, public_path: Path) -> None:
    """Write a new key pair (the private key 0600) unless one is there already."""
    if private_path.exists() and public_path.exists():
        return
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise ConfigError(f"no {what} configured")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


class TicketSigner:
    def __init__(self, private_path: Path | None) -> None:
        """Raises ConfigError when the key cannot be read (AIRLOCK_TICKET_KEY)."""
        key = serialization.load_pem_private_key(
            _read(private_path, "ticket signing key (AIRLOCK_TICKET_KEY)"), None
        )
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{private_path}: not an Ed25519 private key")
        self._key = key

    def sign(self, task_id: str, spec: Any, queue: str, identities: Identities) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "jti": task_id,
            "iat": now,
            "exp": now + TICKET_TTL_S,
            "spec": spec_digest(spec),
            # Named apart from the digest: Vault lets a ticket's holder mint credentials for
            # this agent only (the ticket auth roles bind this claim; vault setup).
            "agent": spec.get("agent") if isinstance(spec, dict) else None,
            "queue": queue,
            "submitter": identities.submitter.to_json(),
            "user": identities.user,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)


@dataclass(frozen=True)
class Ticket:
    identities: Identities
    queue: str
    text: str  # the ticket itself: presented to Vault to mint the task's credentials


class TicketVerifier:
    def __init__(self, public_path: Path | None) -> None:
        """Raises ConfigError when the key cannot be read (AIRLOCK_TICKET_PUBLIC_KEY)."""
        key = serialization.load_pem_public_key(
            _read(public_path, "ticket public key (AIRLOCK_TICKET_PUBLIC_KEY)")
        )
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{public_path}: not an Ed25519 public key")
        self._key = key

    def verify(self, ticket: object, task_id: str, spec: Any) -> Ticket:
        """The identities a valid ticket for exactly this task and spec vouches for.
        Raises InvalidTicket."""
        if not isinstance(ticket, str) or not ticket:
            raise InvalidTicket("no admission ticket (only the front door may enqueue)")
        try:
            claims = jwt.decode(
                ticket,
                self._key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidTicket(f"admission ticket refused ({exc})") from None
        if claims["jti"] != task_id:
            raise InvalidTicket("admission ticket is for another task")
        if claims.get("spec") != spec_digest(spec):
            raise InvalidTicket("task spec differs from the one the ticket was signed for")
        agent = spec.get("agent") if isinstance(spec, dict) else None
        if claims.get("agent") != agent:
            raise InvalidTicket("admission ticket is for another agent")
        user = claims.get("user")
        if user is not None and not isinstance(user, str):
            raise InvalidTicket("admission ticket names a malformed user")
        try:
            submitter = Principal.from_json(claims.get("submitter"))
        except ValueError as exc:
            raise InvalidTicket(f"admission ticket: {exc}") from None
        return Ticket(Identities(submitter, user), str(claims.get("queue") or ""), ticket)
