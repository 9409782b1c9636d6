"""The one place that talks to Vault, and the only module that imports `hvac`.

Every call names the token it acts with, so the orchestrator's own token and each task's
token never mix. Vault's errors become ours at this seam: an unreachable or sealed Vault
is ServiceUnavailable; a refusal is VaultRefused, with Vault's own words.

A client with `ride_out_s` (the worker's and the gateway's) repeats a call while Vault is
restarting, until it is back or that long has passed: only a call that did nothing, one
that could not connect or that a sealed Vault turned away, so repeating it is safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
from opentelemetry.trace import SpanKind

from orchestrator.adapters import http1, telemetry
from orchestrator.adapters.retry import ride_out
from orchestrator.config import ca_bundle_from_env, proxies_in_env, vault_tls
from orchestrator.errors import ConfigError, ServiceUnavailable, VaultRefused


@dataclass(frozen=True)
class AppRoleLogin:
    """How a part of Airlock logs in: an AppRole's role id and secret id (files, 0600)."""

    mount: str
    role_id: str
    secret_id: str = ""

    @classmethod
    def from_dir(cls, directory: Path, mount: str) -> AppRoleLogin:
        """Raises ConfigError when the files are not there."""
        try:
            role_id = (directory / "role_id").read_text().strip()
            secret_id = (directory / "secret_id").read_text().strip()
        except OSError as exc:
            raise ConfigError(f"Vault AppRole credentials in {directory}: {exc}") from exc
        return cls(mount, role_id, secret_id)


# A token is renewed once two thirds of its time to live are gone.
RENEW_AT = 2 / 3


class Vault:
    def __init__(
        self,
        addr: str,
        token: str | None,
        timeout: float = 10.0,
        ride_out_s: float = 0.0,
        login: AppRoleLogin | None = None,
    ) -> None:
        self.addr = addr
        where = urlsplit(addr)
        default_port = 443 if where.scheme == "https" else 80
        self._server: dict[str, str | int] = {
            "server.address": where.hostname or "",
            "server.port": where.port or default_port,
        }
        self.token = token
        self.ride_out_s = ride_out_s
        # With a login, this client's own token is its own: acquired at first use, renewed
        # before it expires, and acquired again when Vault no longer knows it (a restart).
        self.login = login
        self._renew_at = 0.0
        self._token_lock = threading.Lock()
        # No default token on the client: each request carries the token it acts with.
        # (hvac falls back to VAULT_TOKEN when given None; that must not happen here.)
        # hvac's requests go through http1 (a sixth of requests' CPU per call), unless the
        # environment names a proxy: then through requests, which knows proxies.
        session: Any
        options: dict[str, Any] = {}
        if proxies_in_env():
            session = requests.Session()
            bundle = ca_bundle_from_env()
            if bundle:
                options["verify"] = bundle
        else:
            tls = vault_tls() if addr.startswith("https://") else None
            try:
                session = http1.Session(addr, timeout=timeout, tls=tls)
            except ValueError as exc:
                raise ServiceUnavailable("vault", f"{exc}: use http:// or https://") from None
        self._client = hvac.Client(
            url=addr, token=None, timeout=timeout, session=session, **options
        )
        self._client.token = None

    def call(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        wrap_ttl: str | None = None,
        missing_ok: bool = False,
        absent_ok: bool = False,
        ride_out_s: float | None = None,
    ) -> dict[str, Any] | None:
        """One API call: `path` without the /v1/ prefix. Returns the JSON body, if any.

        With `missing_ok`, a 404 answers None instead of raising; with `absent_ok`, so does
        a 400 (how lookups say they do not know the token or lease). `ride_out_s` overrides
        the client's for this call. Raises VaultRefused (Vault answered no) or
        ServiceUnavailable (Vault did not answer, or is sealed).
        """
        own = token is None
        if own and self.login is not None:
            self._fresh_token()
        headers = {"X-Vault-Token": token or self.token or ""}
        # One span per call: method and path only (paths hold no secret values).
        with telemetry.tracer().start_as_current_span(
            f"vault {method} {path}",
            kind=SpanKind.CLIENT,
            attributes={
                **self._server,
                "http.request.method": method,
                "url.path": f"/v1/{path}",
                "airlock.vault.path": path,
                "airlock.vault.wrapped": bool(wrap_ttl),
            },
        ):
            seconds = self.ride_out_s if ride_out_s is None else ride_out_s
            try:
                return ride_out(
                    lambda: self._call(
                        method, path, data, headers, wrap_ttl, missing_ok, absent_ok
                    ),
                    seconds,
                    lambda exc: isinstance(exc, _Restarting),
                )
            except _Restarting as exc:
                raise ServiceUnavailable("vault", exc.detail) from exc.__cause__
            except VaultRefused:
                if not (own and self.login is not None and self._lost_token()):
                    raise
            # Our token is gone (Vault restarted, or it was revoked): log in again, once.
            headers["X-Vault-Token"] = self._log_in()
            return self._call(method, path, data, headers, wrap_ttl, missing_ok, absent_ok)

    # -- this client's own token (with a login) ----------------------------------------------
    def _fresh_token(self) -> None:
        with self._token_lock:
            if self.token and time.monotonic() < self._renew_at:
                return
            if self.token:
                try:
                    renewed = (
                        self._call(
                            "POST",
                            "auth/token/renew-self",
                            {},
                            {"X-Vault-Token": self.token},
                            None,
                            False,
                            False,
                        )
                        or {}
                    )
                    self._until(renewed)
                    return
                except (VaultRefused, _Restarting):
                    pass  # past its maximum, or unknown: a new login below
            self._log_in_locked()

    def _log_in(self) -> str:
        with self._token_lock:
            return self._log_in_locked()

    def _log_in_locked(self) -> str:
        assert self.login is not None
        answer = (
            self._call(
                "POST",
                f"auth/{self.login.mount}/login",
                {"role_id": self.login.role_id, "secret_id": self.login.secret_id},
                {},
                None,
                False,
                False,
            )
            or {}
        )
        self.token = str(answer["auth"]["client_token"])
        self._until(answer)
        return self.token

    def _until(self, answer: dict[str, Any]) -> None:
        """Renew at two thirds of the token's life (one that cannot be renewed is replaced
        then, by a new login); a token without a TTL is looked at again in an hour."""
        ttl = float((answer.get("auth") or {}).get("lease_duration") or 0)
        self._renew_at = time.monotonic() + (ttl * RENEW_AT if ttl else 3600)

    def _lost_token(self) -> bool:
        """Whether Vault no longer knows this client's own token."""
        try:
            self._call(
                "GET",
                "auth/token/lookup-self",
                None,
                {"X-Vault-Token": self.token or ""},
                None,
                False,
                False,
            )
        except VaultRefused:
            return True
        except _Restarting:
            return False
        return False

    def _call(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None,
        headers: dict[str, str],
        wrap_ttl: str | None,
        missing_ok: bool,
        absent_ok: bool,
    ) -> dict[str, Any] | None:
        try:
            response = self._client.adapter.request(
                method, f"/v1/{path}", headers=headers, json=data, wrap_ttl=wrap_ttl
            )
        except (hvac.exceptions.VaultError, requests.RequestException, OSError) as exc:
            if isinstance(exc, hvac.exceptions.InvalidPath) and (missing_ok or absent_ok):
                return None
            if isinstance(exc, hvac.exceptions.InvalidRequest) and absent_ok:
                return None
            raise _translated(exc, method, path, self.addr) from exc
        if isinstance(response, dict):
            return response
        return None

    def read(self, path: str, **kw: Any) -> dict[str, Any] | None:
        return self.call("GET", path, **kw)

    def write(
        self, path: str, data: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any] | None:
        return self.call("POST", path, data or {}, **kw)

    def delete(self, path: str, **kw: Any) -> None:
        self.call("DELETE", path, **kw)

    def list(self, path: str, **kw: Any) -> list[str]:
        body = self.call("LIST", path, missing_ok=True, **kw)
        return list((body or {}).get("data", {}).get("keys", []))

    def ping(self) -> None:
        """Raises ServiceUnavailable unless Vault answers, unsealed, and our token works."""
        health = self.call("GET", "sys/health")
        if health and health.get("sealed"):
            raise ServiceUnavailable("vault", f"{self.addr} is sealed")
        self.read("auth/token/lookup-self")


class _Restarting(Exception):
    """Vault did nothing with the call (could not connect, or sealed): safe to repeat."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _translated(exc: Exception, method: str, path: str, addr: str) -> Exception:
    """Vault's answer (or silence) as one of ours; _Restarting when Vault did nothing."""
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return VaultRefused(f"{method} {path}: not found")
    if isinstance(exc, hvac.exceptions.VaultDown):  # sealed
        return _Restarting(f"{method} {path}: {exc}")
    if isinstance(exc, hvac.exceptions.BadGateway):
        return ServiceUnavailable("vault", f"{method} {path}: {exc}")
    if isinstance(exc, hvac.exceptions.VaultError):
        return _refused(method, path, exc)
    if http1.never_sent(exc):
        return _Restarting(f"{addr}: {exc.__class__.__name__}")
    return ServiceUnavailable("vault", f"{addr}: {exc.__class__.__name__}")


def _refused(method: str, path: str, exc: hvac.exceptions.VaultError) -> VaultRefused:
    """Vault's refusal, in Vault's own words."""
    errors = "; ".join(str(e) for e in (exc.errors or [])) or str(exc)
    return VaultRefused(f"{method} {path}: {errors}")
