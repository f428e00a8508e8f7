"""Read SNI and ALPN out of a TLS ClientHello without doing any I/O.

The server peeks (MSG_PEEK) at the first bytes of a connection and picks the certificate
before OpenSSL sees them, so this parser must tell "incomplete" from "not TLS" on any
prefix: a truncated valid hello always yields `Incomplete`, never an error, and says how
many bytes to wait for, so that the server sleeps until they are there instead of polling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_RECORD_LENGTH = 2**14  # RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes
MAX_HELLO_LENGTH = 2**15
"""A ClientHello body may span records (post-quantum key shares, many extensions). Peeking
consumes nothing, so the whole hello must fit in a fresh connection's receive window
(64 KiB): half of that leaves room, and is twice the largest hello browsers send."""
MAX_CLIENT_HELLO_BYTES = MAX_HELLO_LENGTH + 512
"""Peeking this many bytes always settles the question: a hello whose records (headers
included) do not fit is refused, however it is fragmented."""

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST_NAME = 0
_HTTP_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} ")  # RFC 9110 token, space


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # SNI host_name, lower-case ASCII; None when absent
    alpn: tuple[str, ...]  # offered protocols in client order; empty when absent


@dataclass(frozen=True)
class Incomplete:
    """`data` is a valid beginning; parsing goes on once `needed` bytes are there (always
    more than were given, and never more than the client's whole hello)."""

    needed: int


class ClientHelloError(ValueError):
    """The bytes are not the start of a TLS connection, or the hello is malformed."""


class PlainHTTPRequest(ClientHelloError):
    """The bytes start like an HTTP request line: a client speaking HTTP to the TLS port."""


def parse_client_hello(data: bytes) -> ClientHello | Incomplete:
    """Parse the ClientHello at the start of `data`, or say how much more to wait for."""
    if data[:1] != bytes([_CONTENT_HANDSHAKE]) and _HTTP_METHOD.match(data):
        raise PlainHTTPRequest("an HTTP request, not TLS")
    message = bytearray()
    pos = 0
    while True:
        header = data[pos : pos + _RECORD_HEADER]
        _check_record_header(header)
        if len(header) < _RECORD_HEADER:
            return Incomplete(pos + _RECORD_HEADER)
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD_LENGTH:
            raise ClientHelloError(f"bad TLS record length {length}")
        if pos + _RECORD_HEADER + length > MAX_CLIENT_HELLO_BYTES:
            raise ClientHelloError("ClientHello spans too many bytes")
        fragment = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        message += fragment
        body_length = _check_handshake_header(message)
        if body_length is not None and len(message) >= _HANDSHAKE_HEADER + body_length:
            body = bytes(message[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + body_length])
            return _parse_body(body)
        pos += _RECORD_HEADER + length
        if pos > len(data):  # this record is still arriving
            return Incomplete(pos)


def _check_record_header(header: bytes) -> None:
    """Reject a (possibly partial) record header that cannot start a TLS handshake."""
    if len(header) >= 1 and header[0] != _CONTENT_HANDSHAKE:
        raise ClientHelloError("not a TLS handshake record")
    if len(header) >= 2 and header[1] != 3:
        raise ClientHelloError("not a TLS record version")


def _check_handshake_header(message: bytearray) -> int | None:
    """The ClientHello body length once known; errors as soon as a prefix is wrong."""
    if len(message) >= 1 and message[0] != _HANDSHAKE_CLIENT_HELLO:
        raise ClientHelloError("first handshake message is not a ClientHello")
    if len(message) < _HANDSHAKE_HEADER:
        return None
    length = int.from_bytes(message[1:4], "big")
    if length > MAX_HELLO_LENGTH:
        raise ClientHelloError(f"ClientHello of {length} bytes is too large")
    return length


class _Reader:
    """Bounds-checked cursor over TLS presentation-language vectors."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ClientHelloError("ClientHello field runs past its end")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, *, min_length: int = 0, max_length: int = 2**24) -> _Reader:
        length = self.uint(length_size)
        if not min_length <= length <= max_length:
            raise ClientHelloError(f"vector length {length} out of range")
        return _Reader(self.take(length))

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def done(self) -> bool:
        return self._pos == len(self._data)

    def expect_end(self) -> None:
        if not self.done():
            raise ClientHelloError("trailing bytes in ClientHello field")


def _parse_body(body: bytes) -> ClientHello:
    reader = _Reader(body)
    if reader.uint(1) != 3:
        raise ClientHelloError("unsupported ClientHello version")
    reader.take(1 + 32)  # minor version, random
    reader.vector(1, max_length=32)  # legacy_session_id
    if reader.vector(2, min_length=2).remaining() % 2:
        raise ClientHelloError("cipher_suites has an odd length")
    reader.vector(1, min_length=1)  # legacy_compression_methods
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if not reader.done():  # extensions are optional before TLS 1.3
        extensions = reader.vector(2)
        reader.expect_end()
        seen: set[int] = set()
        while not extensions.done():
            ext_type = extensions.uint(2)
            ext_data = extensions.vector(2)
            if ext_type in seen:
                raise ClientHelloError(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                server_name = _parse_server_name(ext_data)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext_data)
    return ClientHello(server_name=server_name, alpn=alpn)


def _parse_server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, min_length=1)
    ext.expect_end()
    host_name: str | None = None
    while not names.done():
        name_type = names.uint(1)
        name = names.vector(2, min_length=1).rest()
        if name_type == _NAME_TYPE_HOST_NAME and host_name is None:
            try:
                host_name = name.decode("ascii").lower()
            except UnicodeDecodeError:
                raise ClientHelloError("SNI host_name is not ASCII") from None
    return host_name


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, min_length=2)
    ext.expect_end()
    offered: list[str] = []
    while not protocols.done():
        # latin-1 maps every byte, so odd protocol ids never fail the connection.
        offered.append(protocols.vector(1, min_length=1).rest().decode("latin-1"))
    return tuple(offered)
