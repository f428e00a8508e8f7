"""HTTP/2 header blocks to the shared request model, checked as RFC 9113 §8.2-8.3 asks.

h2 can validate header blocks itself, but its checks are per-byte Python generators that
cost more than the rest of a request, and it treats a malformed request as a connection
error. Here a few regular expressions do the same work, and the caller turns `Malformed`
into a stream error (RST_STREAM PROTOCOL_ERROR), as §8.1.1 says. Whatever passes is also
valid HTTP/1.1, so it can be forwarded to any upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.http.headers import CONNECTION_SPECIFIC
from proxy.http.model import Headers, Request

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a method
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a field name: lower case in HTTP/2
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_NO_SPACE = re.compile(rb"[\x21-\x7e\x80-\xff]+")  # :authority, Host
_TARGET = re.compile(rb"[\x21-\x7e]+")  # :path: visible ASCII, as an HTTP/1.1 request line
_DIGITS = re.compile(rb"[0-9]{1,18}")


class Malformed(Exception):
    """A request or trailer block RFC 9113 §8.1.1 calls malformed: a stream error."""


def request_from_headers(
    headers: Iterable[tuple[bytes, bytes]],
    end_stream: bool,
    client_ip: str,
    http_version: bytes = b"2",
) -> Request:
    """The `Request` of a HEADERS block; raises Malformed. HTTP/3 has the same rules
    (RFC 9114 §4.3) and passes b"3".

    :authority becomes the host (else Host); cookie crumbs are joined with "; " (RFC 9113
    §8.2.3); connection-specific fields are refused (§8.2.2), TE allowed only as "trailers".
    """
    method = path = authority = host = scheme = protocol = None
    fields: Headers = []
    cookies: list[bytes] = []
    regular = False
    length: bytes | None = None
    for name, value in headers:
        if name.startswith(b":"):
            if regular:
                raise Malformed("pseudo-header after a regular field")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and path is None:
                path = value
            elif name == b":authority" and authority is None:
                authority = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            elif name == b":protocol" and protocol is None:
                protocol = value
            else:
                raise Malformed(f"unexpected or repeated pseudo-header {name!r}")
            continue
        regular = True
        if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise Malformed(f"invalid field {name!r}")
        if name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise Malformed("repeated Host")
            host = value
        elif name in CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
            raise Malformed(f"connection-specific field {name!r}")
        else:
            if name == b"content-length":
                if not _DIGITS.fullmatch(value) or (length is not None and value != length):
                    raise Malformed("invalid or conflicting content-length")
                length = value
            fields.append((name, value))
    if end_stream and length is not None and int(length) != 0:
        raise Malformed("content-length promises a body the stream does not have")
    if method is None or not _TOKEN.fullmatch(method):
        raise Malformed("missing or invalid :method")
    if protocol is not None:
        # Extended CONNECT (RFC 8441): a WebSocket (or other protocol) over this stream,
        # forwarded as an HTTP/1.1 Upgrade of a GET for :path.
        if method != b"CONNECT" or not _TOKEN.fullmatch(protocol) or authority is None:
            raise Malformed(":protocol without CONNECT, or without :authority")
        method = b"GET"
    if method == b"CONNECT":
        target = authority  # authority-form, as HTTP/1.1 spells a CONNECT target
    elif scheme is None or path is None or not (path.startswith(b"/") or path == b"*"):
        raise Malformed("missing :scheme or invalid :path")
    else:
        target = path
    if target is None or not _TARGET.fullmatch(target):
        raise Malformed("invalid request target")
    if authority is not None and host is not None and host != authority:
        raise Malformed("Host differs from :authority")
    host = authority if authority is not None else host
    if host and not _NO_SPACE.fullmatch(host):
        raise Malformed("invalid :authority")
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    return Request(
        method=method,
        target=target,
        host=host or b"",
        headers=fields,
        http_version=http_version,
        has_body=not end_stream and protocol is None,  # a tunnel's bytes are no body
        client_ip=client_ip,
        upgrade=None if protocol is None else protocol.lower(),
    )


def trailers_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A trailer block as forwardable fields; raises Malformed (no pseudo-headers allowed)."""
    fields: Headers = []
    for name, value in headers:
        if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise Malformed(f"invalid trailer field {name!r}")
        if name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific trailer field {name!r}")
        fields.append((name, value))
    return fields
