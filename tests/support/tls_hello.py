"""ClientHellos of a real TLS client (Python's OpenSSL), as bytes, for raw-socket tests."""

from __future__ import annotations

import ssl


def python_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a Python ssl client, read from its outgoing memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a client handshake cannot finish without a server")


def split_records(hello: bytes, fragment_size: int) -> bytes:
    """Re-frame the handshake message of a hello into records of `fragment_size`."""
    header, message, pos = hello[:5], b"", 0
    while pos < len(hello):
        length = int.from_bytes(hello[pos + 3 : pos + 5], "big")
        message += hello[pos + 5 : pos + 5 + length]
        pos += 5 + length
    assert pos == len(hello), "expected whole records"
    out = b""
    for start in range(0, len(message), fragment_size):
        fragment = message[start : start + fragment_size]
        out += header[:3] + len(fragment).to_bytes(2, "big") + fragment
    return out


def long_alpn(count: int) -> list[str]:
    """ALPN protocol names of 203 bytes: a way to make a real hello large."""
    return [f"{i:03d}" + "x" * 200 for i in range(count)]


def big_hello(alpn_count: int) -> bytes:
    """A real hello made large by offering many long ALPN protocol names."""
    return python_hello("big.test", long_alpn(alpn_count))


def with_short_extensions(hello: bytes, missing: int) -> bytes:
    """`hello` (one record) with its extensions length `missing` bytes short: the shape of
    a malformed hello that OpenSSL answers with a decode_error alert."""
    pos = 5 + 4 + 2 + 32  # record and handshake headers, legacy_version, random
    pos += 1 + hello[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + hello[pos]  # legacy_compression_methods
    length = int.from_bytes(hello[pos : pos + 2], "big")
    assert pos + 2 + length == len(hello), "expected one record ending with the extensions"
    return hello[:pos] + (length - missing).to_bytes(2, "big") + hello[pos + 2 :]
