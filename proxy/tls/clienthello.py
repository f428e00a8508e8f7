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


def _vector(data: bytes, pos: int, end: int, size: int, least: int = 0) -> tuple[int, int]:
    """The bounds of the vector at `pos` whose length takes `size` bytes (TLS presentation
    language), inside `data[:end]`. Offsets, not slices: a hello has ~20 vectors, and this
    runs for every new connection."""
    start = pos + size
    if start > end:
        raise ClientHelloError("ClientHello field runs past its end")
    stop = start + int.from_bytes(data[pos:start], "big")
    if stop > end:
        raise ClientHelloError("ClientHello field runs past its end")
    if stop - start < least:
        raise ClientHelloError(f"vector length {stop - start} below {least}")
    return start, stop


def _parse_body(body: bytes) -> ClientHello:
    end = len(body)
    if end < 34:
        raise ClientHelloError("ClientHello field runs past its end")
    if body[0] != 3:
        raise ClientHelloError("unsupported ClientHello version")
    start, pos = _vector(body, 34, end, 1)  # after version and random: legacy_session_id
    if pos - start > 32:
        raise ClientHelloError(f"vector length {pos - start} out of range")
    start, pos = _vector(body, pos, end, 2, least=2)  # cipher_suites
    if (pos - start) % 2:
        raise ClientHelloError("cipher_suites has an odd length")
    _, pos = _vector(body, pos, end, 1, least=1)  # legacy_compression_methods
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if pos == end:  # extensions are optional before TLS 1.3
        return ClientHello(server_name=server_name, alpn=alpn)
    pos, stop = _vector(body, pos, end, 2)
    if stop != end:
        raise ClientHelloError("trailing bytes in ClientHello field")
    seen: set[int] = set()
    while pos < stop:  # each extension: type (2 bytes), length (2 bytes), data
        start = pos + 4
        if start > stop:
            raise ClientHelloError("ClientHello field runs past its end")
        ext_type = body[pos] << 8 | body[pos + 1]
        pos = start + (body[pos + 2] << 8 | body[pos + 3])
        if pos > stop:
            raise ClientHelloError("ClientHello field runs past its end")
        if ext_type in seen:
            raise ClientHelloError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(body, start, pos)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body, start, pos)
    return ClientHello(server_name=server_name, alpn=alpn)


def _parse_server_name(data: bytes, pos: int, end: int) -> str | None:
    pos, stop = _vector(data, pos, end, 2, least=1)
    if stop != end:
        raise ClientHelloError("trailing bytes in ClientHello field")
    host_name: str | None = None
    while pos < stop:
        name_type = data[pos]
        start, pos = _vector(data, pos + 1, stop, 2, least=1)
        if name_type == _NAME_TYPE_HOST_NAME and host_name is None:
            try:
                host_name = data[start:pos].decode("ascii").lower()
            except UnicodeDecodeError:
                raise ClientHelloError("SNI host_name is not ASCII") from None
    return host_name


def _parse_alpn(data: bytes, pos: int, end: int) -> tuple[str, ...]:
    pos, stop = _vector(data, pos, end, 2, least=2)
    if stop != end:
        raise ClientHelloError("trailing bytes in ClientHello field")
    offered: list[str] = []
    while pos < stop:
        start, pos = _vector(data, pos, stop, 1, least=1)
        # latin-1 maps every byte, so odd protocol ids never fail the connection.
        offered.append(data[start:pos].decode("latin-1"))
    return tuple(offered)
