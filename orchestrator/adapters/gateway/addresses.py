"""Host names and addresses as an attacker spells them, and which of them are internal.

`normalize_host` turns every spelling a client could use for one host into one canonical
form: lower-case names without the trailing dot, and IPv4 written in decimal, hex, octal or
short forms ("2130706433", "0x7f.1", "0177.0.0.1", "127.1") into dotted quads, so that a
check can never be passed by a spelling. `internal_reason` says why an address must not be
reached without an explicit grant: loopback, private, link-local (cloud metadata), CGNAT,
unspecified, multicast, broadcast, reserved, and the IPv6 forms that embed such an IPv4
address (mapped, compatible, NAT64, 6to4, Teredo).
"""

from __future__ import annotations

import functools
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_V4_PART = re.compile(r"^(0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*)$")
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
}


class BadHost(ValueError):
    """The host is not a well-formed name or address."""


def _parse_v4_part(part: str) -> int:
    if not _V4_PART.match(part):
        raise BadHost(f"not a number: {part!r}")
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8)
    return int(part)


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton() would read from `host` (1 to 4 parts, any base), or None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.match(p) for p in parts):
        return None
    values = [_parse_v4_part(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise BadHost(f"IPv4 address out of range: {host!r}")
    number = 0
    for value in head:
        number = number * 256 + value
    number = number * 256 ** (5 - len(values)) + last
    return ipaddress.IPv4Address(number)


@functools.lru_cache(maxsize=4096)
def normalize_host(raw: str) -> str:
    """The canonical spelling of a host (from a URL, Host header or CONNECT target)."""
    host = raw.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:
        raise BadHost("scoped IPv6 addresses are not allowed")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise BadHost(f"not an IPv6 address: {raw!r}") from None
    host = host.removesuffix(".")
    if not host or len(host) > 253:
        raise BadHost(f"bad host name: {raw!r}")
    v4 = parse_ipv4_loose(host)
    if v4 is not None:
        return str(v4)
    if not all(_LABEL.match(label) for label in host.split(".")):
        raise BadHost(f"bad host name: {raw!r}")
    if host.split(".")[-1].isdigit():
        raise BadHost(f"bad host name: {raw!r}")  # '1.2.3.999' and friends
    return host


@functools.lru_cache(maxsize=4096)
def as_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, in the forms that route to one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64 or address in NAT64_LOCAL:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's (obfuscated in the address, decoded here)
    if int(address) >> 32 == 0 and int(address) > 1:  # IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(address))
    return None


def is_metadata(address: IPAddress) -> bool:
    """A cloud metadata address, written plainly or inside an IPv6 address. No grant, not
    even `internal: true`, reaches one: it hands out the host's own cloud credentials."""
    if address in METADATA:
        return True
    inner = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return inner is not None and inner in METADATA


@functools.lru_cache(maxsize=4096)
def internal_reason(address: IPAddress, own: frozenset[IPAddress] = frozenset()) -> str | None:
    """Why `address` is internal (and denied unless granted), or None if it is public.

    Asked for every address of every request, and pure: remembered (the checks below take
    microseconds; a public IPv6 address, eight)."""
    if address in METADATA:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            reason = internal_reason(inner, own)
            return f"{reason} (inside an IPv6 address)" if reason else None
    checks = [
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("carrier-grade NAT", isinstance(address, ipaddress.IPv4Address) and address in CGNAT),
        ("broadcast", address == ipaddress.IPv4Address("255.255.255.255")),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    ]
    for name, hit in checks:
        if hit:
            return name
    return "an address of this host" if address in own else None
