"""The server name a TLS ClientHello asks for, read from the first bytes of a tunnel.

A CONNECT names one host, but inside the tunnel the client's TLS handshake names another
(SNI), and shared front ends (CDNs) route by the second: domain fronting. The gateway reads
the ClientHello before relaying a byte, and cuts the tunnel unless it names the CONNECT
host (or, for a CONNECT to an IP address, names none). Pure functions, table-tested.
"""

from __future__ import annotations

MAX_HELLO = 1 << 16  # a ClientHello, even with post-quantum key shares, is far smaller
_HANDSHAKE, _CLIENT_HELLO, _SERVER_NAME, _HOST_NAME = 0x16, 0x01, 0x0000, 0x00


class NotTls(ValueError):
    """The bytes are not (the start of) a TLS ClientHello."""


def hello_length(data: bytes) -> int | None:
    """How many bytes the whole ClientHello takes (its handshake records), once `data` holds
    enough to say; None while more is needed. Raises NotTls."""
    found = _client_hello(data)
    return None if found is None else found[1]


def _client_hello(data: bytes) -> tuple[bytes, int] | None:
    """The ClientHello message's body, joined from its handshake records, and the bytes
    those records take; None while `data` holds only part of it. Raises NotTls."""
    message = b""
    offset = 0
    while True:
        if len(data) < offset + 5:
            return None
        kind, length = data[offset], int.from_bytes(data[offset + 3 : offset + 5], "big")
        if kind != _HANDSHAKE or data[offset + 1] != 0x03 or not 0 < length <= 1 << 14:
            raise NotTls("the tunnel does not start with a TLS handshake")
        if len(data) < offset + 5 + length:
            return None
        message += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise NotTls("the first handshake message is not a ClientHello")
            declared = int.from_bytes(message[1:4], "big")
            if len(message) >= 4 + declared:
                return message[4 : 4 + declared], offset
        if offset > MAX_HELLO:
            raise NotTls("the ClientHello is too large")


def server_name(data: bytes) -> str | None:
    """The host name the ClientHello at the start of `data` asks for, lower case; None when
    it names none. Raises NotTls for a malformed or partial one."""
    hello = _client_hello(data)
    if hello is None:
        raise NotTls("not a whole ClientHello")
    reader = _Reader(hello[0])
    reader.take(2 + 32)  # version, random
    reader.take(reader.number(1))  # session id
    reader.take(reader.number(2))  # cipher suites
    reader.take(reader.number(1))  # compression methods
    if reader.done():
        return None  # no extensions at all
    extensions = _Reader(reader.take(reader.number(2)))
    found: str | None = None
    while not extensions.done():
        kind, body = extensions.number(2), _Reader(extensions.take(extensions.number(2)))
        if kind == _SERVER_NAME:
            if found is not None:
                raise NotTls("two server_name extensions")
            found = _host_name(_Reader(body.take(body.number(2))))
    return found


def _host_name(names: _Reader) -> str | None:
    """The one host name of a server_name list."""
    found: str | None = None
    while not names.done():
        name_type, name = names.number(1), names.take(names.number(2))
        if name_type != _HOST_NAME:
            continue
        if found is not None:
            raise NotTls("two host names in server_name")
        try:
            found = name.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            raise NotTls("a server name that is not ASCII") from None
    return found


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise NotTls("a ClientHello field runs past its end")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def done(self) -> bool:
        return self.at >= len(self.data)
