"""The one place that talks to Vault, and the only module that imports `hvac`.

Every call names the token it acts with, so the orchestrator's own token and each task's
token never mix. Vault's errors become ours at this seam: an unreachable or sealed Vault
is ServiceUnavailable; a refusal is VaultRefused, with Vault's own words.
"""

from __future__ import annotations

import os
from typing import Any

import hvac
import hvac.exceptions
import requests
from opentelemetry import trace

from orchestrator.config import ca_bundle_from_env, proxies_in_env
from orchestrator.errors import ServiceUnavailable, VaultRefused


class Vault:
    def __init__(self, addr: str, token: str | None, timeout: float = 10.0) -> None:
        self.addr = addr
        self.token = token
        # No default token on the client: each request carries the token it acts with.
        # (hvac falls back to VAULT_TOKEN when given None; that must not happen here.)
        # The environment is read once here, not on every request: its proxies (if any
        # are named, requests keeps looking them up) and its CA bundle.
        session = requests.Session()
        session.trust_env = proxies_in_env()
        bundle = None if os.environ.get("VAULT_CACERT") else ca_bundle_from_env()
        self._client = hvac.Client(
            url=addr,
            token=None,
            timeout=timeout,
            session=session,
            **({"verify": bundle} if bundle else {}),
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
    ) -> dict[str, Any] | None:
        """One API call: `path` without the /v1/ prefix. Returns the JSON body, if any.

        With `missing_ok`, a 404 answers None instead of raising. Raises VaultRefused
        (Vault answered no) or ServiceUnavailable (Vault did not answer, or is sealed).
        """
        headers = {"X-Vault-Token": token or self.token or ""}
        # One span per call: method and path only (paths hold no secret values).
        with trace.get_tracer("airlock").start_as_current_span(
            f"vault {method} {path}",
            attributes={"vault.path": path, "vault.wrapped": bool(wrap_ttl)},
        ):
            return self._call(method, path, data, headers, wrap_ttl, missing_ok)

    def _call(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None,
        headers: dict[str, str],
        wrap_ttl: str | None,
        missing_ok: bool,
    ) -> dict[str, Any] | None:
        try:
            response = self._client.adapter.request(
                method, f"/v1/{path}", headers=headers, json=data, wrap_ttl=wrap_ttl
            )
        except hvac.exceptions.InvalidPath:
            if missing_ok:
                return None
            raise VaultRefused(f"{method} {path}: not found") from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.BadGateway) as exc:
            raise ServiceUnavailable("vault", f"{method} {path}: {exc}") from exc
        except hvac.exceptions.VaultError as exc:
            errors = "; ".join(str(e) for e in (exc.errors or [])) or str(exc)
            raise VaultRefused(f"{method} {path}: {errors}") from exc
        except requests.RequestException as exc:
            raise ServiceUnavailable("vault", f"{self.addr}: {exc.__class__.__name__}") from exc
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
