"""TLS interception: the gateway's side of a task's intercepted HTTPS tunnel.

Where a rule must see inside HTTPS (methods, paths, MCP messages, injected credentials), the
gateway ends the task's TLS itself, with a leaf certificate for the CONNECT host issued by
the gateway CA in Vault's PKI engine (the CA key never leaves Vault), and opens a fresh,
verified TLS connection upstream. A leaf lives an hour and is held in memory only; its key
reaches OpenSSL through an anonymous in-memory file, never a path on disk. Tasks trust the
CA through the bundle the runner writes (the bootstrap hands it over).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import VaultRefused

GATEWAY_CA = "airlock-gateway-ca"  # the PKI mount
LEAF_ROLE = "gateway-leaf"
LEAF_TTL_S = 3600
RENEW_AFTER = 2 / 3  # of a leaf's life: a new one is issued from then on
MAX_LEAVES = 1024  # hosts whose leaf is kept (least recently used go first)


class VaultClient(Protocol):
    def read(self, path: str, **kw: Any) -> dict[str, Any] | None: ...

    def write(self, path: str, data: dict[str, Any] | None = None, **kw: Any) -> Any: ...


def server_context(chain_pem: str, key_pem: str) -> ssl.SSLContext:
    """A TLS server context for one host, speaking HTTP/1.1 only. A client's server name
    (SNI), when it sends one, is kept on its connection's SSL object as `airlock_sni` for
    the gateway to compare with the CONNECT host once the handshake is done."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    fd = os.memfd_create("airlock-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, f"{chain_pem}\n{key_pem}\n".encode())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)

    def remember(connection: Any, name: str | None, _: ssl.SSLContext) -> None:
        connection.airlock_sni = name

    context.sni_callback = remember
    return context


def upstream_context(extra_roots: Path | None = None) -> ssl.SSLContext:
    """How the gateway checks the upstreams it speaks TLS to: the system roots, plus a
    deployment's own (AIRLOCK_UPSTREAM_CA_FILE) for upstreams under a private CA."""
    context = ssl.create_default_context()
    if extra_roots is not None:
        context.load_verify_locations(cafile=str(extra_roots))
    context.set_alpn_protocols(["http/1.1"])
    return context


def _address(host: str) -> str | None:
    """The IP address `host` spells (brackets of an IPv6 literal dropped), or None for a name."""
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return None
    return bare


def name_problem(name: str | None, host: str) -> str | None:
    """Why a client that named `name` in its ClientHello is not talking to `host` (the
    CONNECT host, normalized); None when it is. An address has no name (clients send no
    SNI for an IP literal); a host name must be sent and be the same."""
    if _address(host) is not None:
        return None if name is None else f"TLS server name {name!r} in a tunnel to {host}"
    if name is None or name.lower().rstrip(".") != host:
        return f"TLS server name {name!r} is not the CONNECT host {host!r}"
    return None


class LeafCertificates:
    """Per-host leaf certificates from the gateway CA, issued on first use and cached."""

    def __init__(self, vault: VaultClient, mount: str = GATEWAY_CA, ttl_s: int = LEAF_TTL_S):
        self.vault, self.mount, self.ttl_s = vault, mount, ttl_s
        self._contexts: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self._issuing: dict[str, asyncio.Future[tuple[float, ssl.SSLContext]]] = {}
        self._ca: str | None = None
        self._ca_lock = threading.Lock()

    def ca_pem(self) -> str:
        """The gateway CA's certificate (PEM), for the task's trust bundle. Raises
        ServiceUnavailable, or VaultRefused when there is no CA (`airlock vault setup`)."""
        with self._ca_lock:
            if self._ca is None:
                try:
                    answer = self.vault.read(f"{self.mount}/cert/ca") or {}
                except VaultRefused as exc:
                    raise VaultRefused(f"no gateway CA ({exc}); run: airlock vault setup") from None
                found = str((answer.get("data") or {}).get("certificate") or "")
                if not found.startswith("-----BEGIN CERTIFICATE-----"):
                    raise VaultRefused(f"no gateway CA at {self.mount}/; run: airlock vault setup")
                self._ca = found
            return self._ca

    async def context(self, host: str) -> ssl.SSLContext:
        """The server context for `host` (normalized). Issuing goes to Vault on a thread:
        the loop serving every task never waits on it; concurrent asks share one issue."""
        cached = self._contexts.get(host)
        if cached is not None and cached[0] > time.monotonic():
            self._contexts.move_to_end(host)
            return cached[1]
        issuing = self._issuing.get(host)
        if issuing is None:
            loop = asyncio.get_running_loop()
            issuing = loop.run_in_executor(None, self._issue, host)
            self._issuing[host] = issuing
            issuing.add_done_callback(lambda done: self._issued(host, done))
        _, context = await asyncio.shield(issuing)
        return context

    def _issued(self, host: str, done: asyncio.Future[tuple[float, ssl.SSLContext]]) -> None:
        self._issuing.pop(host, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._contexts[host] = done.result()
        self._contexts.move_to_end(host)
        while len(self._contexts) > MAX_LEAVES:
            self._contexts.popitem(last=False)

    def _issue(self, host: str) -> tuple[float, ssl.SSLContext]:
        address = _address(host)
        body: dict[str, Any] = {"common_name": host, "ttl": f"{self.ttl_s}s"}
        body.update({"ip_sans": address} if address else {"alt_names": host})
        started = time.monotonic()
        data = (self.vault.write(f"{self.mount}/issue/{LEAF_ROLE}", body) or {})["data"]
        chain = "\n".join([data["certificate"], *data.get("ca_chain", [])])
        context = server_context(chain, data["private_key"])
        return started + self.ttl_s * RENEW_AFTER, context
