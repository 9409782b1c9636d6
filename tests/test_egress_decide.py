"""The gateway's pure decisions, attacked: spellings, internal ranges, smuggled paths, hosts."""

from __future__ import annotations

import ipaddress

import pytest

from orchestrator.adapters.gateway.addresses import BadHost, internal_reason, normalize_host
from orchestrator.adapters.gateway.decide import (
    Target,
    clean_path,
    decide_addresses,
    decide_request,
)
from tests.grants import compiled_grant

GRANT = compiled_grant(
    egress=[
        {"host": "*.example.com", "ports": [443], "methods": ["GET", "CONNECT"], "paths": []},
        {
            "host": "api.test",
            "ports": [80],
            "methods": ["GET", "POST"],
            "paths": ["/v1/"],
            "scheme": "http",
        },
        {
            "host": "127.0.0.1",
            "ports": [8080],
            "methods": ["GET"],
            "paths": [],
            "internal": True,
            "scheme": "http",
        },
    ],
)

SPELLINGS = [
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("[0:0:0:0:0:ffff:7f00:1]", "::ffff:7f00:1"),
    ("API.Example.COM.", "api.example.com"),
    ("169.254.169.254", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
]


@pytest.mark.parametrize(("raw", "canonical"), SPELLINGS)
def test_every_spelling_is_normalized(raw: str, canonical: str) -> None:
    assert normalize_host(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a..b",
        "exa mple.com",
        "1.2.3.999",
        "256.1.1.1",
        "0x100000000",
        "[fe80::1%eth0]",
        "-bad-.com",
        "x" * 300,
    ],
)
def test_malformed_hosts_are_refused(raw: str) -> None:
    with pytest.raises(BadHost):
        normalize_host(raw)


INTERNAL = [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "a cloud metadata address"),
    ("169.254.10.10", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.100.100.200", "a cloud metadata address"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "a cloud metadata address"),
    ("::ffff:10.0.0.1", "private (inside an IPv6 address)"),
    ("::ffff:169.254.169.254", "a cloud metadata address (inside an IPv6 address)"),
    ("64:ff9b::7f00:1", "loopback (inside an IPv6 address)"),
    ("2002:7f00:1::", "loopback (inside an IPv6 address)"),
    ("2002:c0a8:101::1", "private (inside an IPv6 address)"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private (inside an IPv6 address)"),
    ("::127.0.0.1", "loopback (inside an IPv6 address)"),
]


@pytest.mark.parametrize(("address", "reason"), INTERNAL)
def test_internal_addresses_are_named(address: str, reason: str) -> None:
    assert internal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:1.1.1.1", "2002:101:101::1"],
)
def test_public_addresses_pass(address: str) -> None:
    assert internal_reason(ipaddress.ip_address(address)) is None


def test_the_hosts_own_addresses_are_internal() -> None:
    own = frozenset({ipaddress.ip_address("93.184.216.34")})
    assert internal_reason(ipaddress.ip_address("93.184.216.34"), own) == "an address of this host"


REQUESTS = [
    # (method, host, port, path, Host header) -> allowed, rule
    (("GET", "api.example.com", 443, "/x", None), True, "egress[0] *.example.com"),
    (
        ("CONNECT", "api.example.com", 443, None, "api.example.com:443"),
        True,
        "egress[0] *.example.com",
    ),
    (("GET", "example.com", 443, "/x", None), False, "default-deny"),
    (("GET", "evil-example.com", 443, "/x", None), False, "default-deny"),
    (("GET", "example.com.evil.net", 443, "/x", None), False, "default-deny"),
    (("GET", "api.example.com", 8443, "/x", None), False, "egress[0] *.example.com"),
    (("POST", "api.example.com", 443, "/x", None), False, "egress[0] *.example.com"),
    (("GET", "api.test", 80, "/v1/users", None), True, "egress[1] api.test"),
    (("GET", "api.test", 80, "/v2/users", None), False, "egress[1] api.test"),
    # Dot segments are removed before the rule looks: /v1/../admin is /admin, outside /v1/.
    (("GET", "api.test", 80, "/v1/../admin", None), False, "egress[1] api.test"),
    (("GET", "api.test", 80, "/v1/%2e%2e/admin", None), False, "egress[1] api.test"),
    (("GET", "api.test", 80, "/x/../v1/users", None), True, "egress[1] api.test"),
    (("GET", "api.test", 80, "/v%31/users", None), True, "egress[1] api.test"),
    (("GET", "api.test", 80, "/v1/..%2fadmin", None), False, "ambiguous-path"),
    (("GET", "api.test", 80, "/v1/..;/admin", None), False, "ambiguous-path"),
    (("GET", "api.test", 80, "/v1//admin", None), False, "ambiguous-path"),
    (("GET", "api.test", 80, "//v1/admin", None), False, "ambiguous-path"),
    (("GET", "api.test", 80, "/v1/a%00", None), False, "ambiguous-path"),
    (("GET", "api.test", 80, "/v1/x?next=/admin", None), True, "egress[1] api.test"),
    (("GET", "api.test", 80, "/v1/x", "evil.test"), False, "host-mismatch"),
    (("GET", "api.test", 80, "/v1/x", "api.test:8080"), False, "host-mismatch"),
    (("GET", "API.TEST.", 80, "/v1/x", "api.test"), True, "egress[1] api.test"),
    (("CONNECT", "api.example.com", 443, None, "other.example.com:443"), False, "host-mismatch"),
    (("GET", "2130706433", 8080, "/", None), True, "egress[2] 127.0.0.1"),
    (("GET", "127.0.0.1", 8081, "/", None), False, "egress[2] 127.0.0.1"),
    (("GET", "a b", 80, "/", None), False, "malformed-host"),
    (("GET", "api.test", 0, "/v1/", None), False, "malformed-port"),
    # A plain-HTTP rule opens no tunnel: inside one, its method and path rules would be blind.
    (("CONNECT", "api.test", 80, None, None), False, "egress[1] api.test"),
    (("CONNECT", "127.0.0.1", 8080, None, None), False, "egress[2] 127.0.0.1"),
]


@pytest.mark.parametrize(("request_", "allowed", "rule"), REQUESTS)
def test_request_decisions(request_: tuple, allowed: bool, rule: str) -> None:  # type: ignore[type-arg]
    method, host, port, path, header = request_
    scheme = "https" if port in (443, 8443) else "http"  # https: read inside a tunnel
    verdict = decide_request(GRANT, Target(method, host, port, path, header, scheme))
    assert (verdict.allowed, verdict.rule) == (allowed, rule), verdict.reason


ip = ipaddress.ip_address


def test_every_resolved_address_is_checked() -> None:
    verdict = decide_request(GRANT, Target("GET", "api.example.com", 443, "/", None, "https"))
    ok, chosen = decide_addresses(verdict, [ip("93.184.216.34")])
    assert ok.allowed and chosen == ip("93.184.216.34")
    # a name that resolves to a public and a private address is refused as a whole
    bad, chosen = decide_addresses(verdict, [ip("93.184.216.34"), ip("10.0.0.5")])
    assert not bad.allowed and chosen is None and "10.0.0.5, private" in bad.reason
    rebound, _ = decide_addresses(verdict, [ip("127.0.0.1")])
    assert rebound.rule == "ssrf" and "loopback" in rebound.reason
    none, _ = decide_addresses(verdict, [])
    assert none.rule == "dns"


def test_internal_grant_reaches_internal_addresses_only_for_its_rule() -> None:
    verdict = decide_request(GRANT, Target("GET", "127.0.0.1", 8080, "/", None))
    ok, chosen = decide_addresses(verdict, [ip("127.0.0.1")])
    assert ok.allowed and chosen == ip("127.0.0.1")


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "100.100.100.200", "::ffff:169.254.169.254", "fd00:ec2::254"]
)
def test_no_grant_reaches_a_metadata_service(address: str) -> None:
    """Not even `internal: true`: a name the internal rule allows, rebound to the metadata
    service (in any spelling), is refused."""
    verdict = decide_request(GRANT, Target("GET", "127.0.0.1", 8080, "/", None))
    assert verdict.allowed and verdict.internal
    refused, chosen = decide_addresses(verdict, [ip(address)])
    assert not refused.allowed and chosen is None and "metadata" in refused.reason


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a//b", None),
        ("//a/b", None),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/a/%2e%2E/b", "/b"),
        ("/ap%69/%7e", "/api/~"),
        ("/a/%3f", "/a/%3F"),
        ("/a/..;/b", None),
        ("/a/.;x/b", None),
        ("/a;v=1/b", "/a;v=1/b"),
        ("/a%5cb", None),
        ("/a%00", None),
        ("/a%2", None),
        ("a/b", None),
        ("/a\\b", None),
        ("/a%2Fb", None),
        ("/", "/"),
        ("/a/b?x=../../", "/a/b"),
    ],
)
def test_clean_path(path: str, clean: str | None) -> None:
    assert clean_path(path) == clean
