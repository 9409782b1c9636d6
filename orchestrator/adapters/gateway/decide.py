"""The gateway's decisions as pure functions of (grant, request): no I/O, table-tested.

Two steps, because the second needs DNS: `decide_request` checks what the task asked for
(identity, target host spelling, port, method, path, header consistency) against its grant;
`decide_addresses` checks where the name resolved to, and picks the one address the gateway
will connect to, so that what was checked is exactly what is reached.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from orchestrator.adapters.gateway.addresses import (
    BadHost,
    IPAddress,
    internal_reason,
    is_metadata,
    normalize_host,
)
from orchestrator.core.agent import Injection
from orchestrator.core.grant import CompiledGrant


class Target(NamedTuple):
    """What one request wants to reach, as the client spelled it (a tuple: made and looked up
    in the verdict cache once per request)."""

    method: str
    host: str
    port: int
    path: str | None  # None for CONNECT (the tunnel itself; requests inside come one by one)
    host_header: str | None = None
    scheme: str = "http"  # https: a request read inside an intercepted tunnel


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str
    reason: str
    host: str = ""  # the normalized host, when it could be read
    internal: bool = False  # the matching rule may reach internal addresses
    tls: bool = False  # speak TLS to the upstream
    inject: Injection | None = None  # add this credential for the upstream
    path: str | None = None  # the path in its one normal form (clean_path), once decided
    passthrough: bool = False  # a tunnel left opaque (else intercepted)


def deny(rule: str, reason: str, host: str = "") -> Verdict:
    return Verdict(False, rule, reason, host)


def _host_port(authority: str, default_port: int) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or host.endswith(":") or (authority.startswith("[") and not host.endswith("]")):
        return authority, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadHost(f"bad port in {authority!r}")
    return host, int(port)


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


def clean_path(path: str) -> str | None:
    """The one normal form of a request path (its query and fragment cut off), or None when
    servers could read it two ways. Percent-escapes of unreserved characters are decoded
    (`/ap%69` is `/api`), other escapes upper-cased; dot segments are removed (RFC 3986
    5.2.4, after decoding, so `%2e%2e` counts). Refused: escaped `/`, `\\` or NUL, a
    backslash, a NUL, an empty segment (`//`: servers disagree on it), and `..;` or `.;`
    (Tomcat and others read them as dot segments). What this returns is what the rules see,
    what the audit records and what goes upstream."""
    bare = path.split("?", 1)[0].split("#", 1)[0]
    if not bare.startswith("/") or "\\" in bare or "\0" in bare:
        return None
    decoded = _decode_unreserved(bare)
    return None if decoded is None else _without_dot_segments(decoded)


def _decode_unreserved(path: str) -> str | None:
    """`path` with escapes of unreserved characters decoded and the rest upper-cased; None
    for a broken escape or an escaped separator or NUL."""
    out: list[str] = []
    i = 0
    while i < len(path):
        if path[i] != "%":
            out.append(path[i])
            i += 1
            continue
        digits = path[i + 1 : i + 3]
        if len(digits) != 2 or not set(digits) <= _HEX:
            return None
        char = chr(int(digits, 16))
        if char in "/\\\0":
            return None
        out.append(char if char in _UNRESERVED else "%" + digits.upper())
        i += 3
    return "".join(out)


def _without_dot_segments(path: str) -> str | None:
    """RFC 3986 5.2.4 on an absolute path; None for `//`, `.;` or `..;` segments."""
    kept: list[str] = []
    parts = path.split("/")[1:]
    for n, segment in enumerate(parts):
        last = n == len(parts) - 1
        if ";" in segment and segment.split(";", 1)[0] in (".", ".."):
            return None
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            if last:
                kept.append("")
        elif segment == "" and not last:
            return None
        else:
            kept.append(segment)
    return "/" + "/".join(kept)


def decide_request(grant: CompiledGrant, target: Target) -> Verdict:
    """May the task ask for this? (Where the name points is decided after resolution.)"""
    try:
        host = normalize_host(target.host)
        if target.host_header is not None:
            default = 80 if target.path is not None and target.scheme == "http" else 443
            header_host, header_port = _host_port(target.host_header, default)
            if (normalize_host(header_host), header_port) != (host, target.port):
                return deny("host-mismatch", "Host header names another host than the target", host)
    except BadHost as exc:
        return deny("malformed-host", str(exc))
    if not 0 < target.port < 65536:
        return deny("malformed-port", f"port {target.port} is out of range", host)
    if target.path is None:  # the tunnel; intercepted, its requests come here one by one
        tunnel = grant.check_tunnel(host, target.port)
        return Verdict(
            tunnel.allowed,
            tunnel.rule,
            tunnel.reason,
            host,
            tunnel.internal,
            passthrough=tunnel.passthrough,
        )
    path = clean_path(target.path)
    if path is None:
        return deny("ambiguous-path", "path has dot segments or encoded separators", host)
    https = target.scheme == "https"
    mcp = grant.mcp_server_for(host, target.port, path, target.scheme)
    if mcp is not None:  # a granted MCP server: its messages are checked one by one
        return Verdict(True, f"mcp {mcp[0]}", "granted MCP server", host, mcp[1], https, path=path)
    check = grant.check_egress(host, target.port, target.method, path, target.scheme)
    return Verdict(
        check.allowed, check.rule, check.reason, host, check.internal, check.tls, check.inject, path
    )


def decide_addresses(
    verdict: Verdict,
    addresses: Sequence[IPAddress],
    own: Iterable[IPAddress] = (),
) -> tuple[Verdict, IPAddress | None]:
    """Check every address a name resolved to; returns the verdict and the address to use.

    Every address must pass, not just the first: a name that resolves to a public and an
    internal address is refused, so that no later choice can land inside.
    """
    if not addresses:
        return deny("dns", f"{verdict.host} did not resolve", verdict.host), None
    mine = frozenset(own)
    for address in addresses:
        if verdict.internal:  # private ranges open, a metadata service never
            why = "a cloud metadata address" if is_metadata(address) else None
        else:
            why = internal_reason(address, mine)
        if why:
            return deny("ssrf", f"{verdict.host} resolves to {address}, {why}", verdict.host), None
    return verdict, addresses[0]
