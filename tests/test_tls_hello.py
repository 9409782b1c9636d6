"""Reading the server name of a TLS ClientHello, from hellos a real TLS stack (OpenSSL, via
Python's ssl) writes, whole and in pieces, and refusing what is not one."""

from __future__ import annotations

import ssl

import pytest

from orchestrator.adapters.gateway.proxy import sni_problem
from orchestrator.adapters.gateway.tls_hello import NotTls, hello_length, server_name


def client_hello(name: str | None) -> bytes:
    """The first flight of an OpenSSL client asking for `name` (None: no SNI)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["example.com", "api.github.com", "x" * 60 + ".test"])
def test_the_server_name_of_a_real_hello(name: str) -> None:
    hello = client_hello(name)
    assert hello_length(hello) == len(hello)
    assert server_name(hello) == name


def test_a_hello_without_sni_names_nothing() -> None:
    hello = client_hello(None)
    assert server_name(hello[: hello_length(hello)]) is None


def test_a_hello_arriving_in_pieces_is_waited_for() -> None:
    hello = client_hello("example.com")
    for cut in (1, 4, 5, 6, 50, len(hello) - 1):
        assert hello_length(hello[:cut]) is None
    assert hello_length(hello + b"application data") == len(hello)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a handshake, but a ServerHello
        b"\x17\x03\x03\x00\x10" + b"\x00" * 16,  # application data first
    ],
)
def test_what_is_not_a_client_hello_is_refused(data: bytes) -> None:
    with pytest.raises(NotTls):
        hello_length(data)


def test_a_hello_whose_fields_run_past_its_end_is_refused() -> None:
    hello = bytearray(client_hello("example.com"))
    hello[6:9] = (len(hello) * 4).to_bytes(3, "big")  # the handshake claims more than is there
    with pytest.raises(NotTls):
        server_name(bytes(hello))
    hello = bytearray(client_hello("example.com"))
    hello[5 + 4 + 34] = 255  # a session id longer than the rest of the hello
    hello[5 + 4 + 35 :] = hello[5 + 4 + 35 : 5 + 4 + 35 + 40]
    hello[3:5] = (len(hello) - 5).to_bytes(2, "big")
    hello[6:9] = (len(hello) - 9).to_bytes(3, "big")
    with pytest.raises(NotTls):
        server_name(bytes(hello))


@pytest.mark.parametrize(
    ("name", "host", "cut"),
    [
        ("example.com", "example.com", False),
        ("EXAMPLE.com.", "example.com", False),
        ("cdn-front.example.net", "example.com", True),  # domain fronting
        (None, "example.com", True),  # a name CONNECT, no SNI
        (None, "127.0.0.1", False),  # clients send no SNI for an address
        ("evil.test", "127.0.0.1", True),
        (None, "[::1]", False),
    ],
)
def test_the_sni_must_be_the_connect_host(name: str | None, host: str, cut: bool) -> None:
    assert (sni_problem(client_hello(name), host) is not None) is cut
