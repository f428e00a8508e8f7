"""What the HTTP/1.1 parser accepts in a request head and a proxy still refuses.

llhttp (`h1_parser`) already refuses bare LF, obs-fold, whitespace before a colon, Content-Length
with Transfer-Encoding and malformed lengths. It takes a Transfer-Encoding of "CHUNKED", or
with whitespace around it, as chunked, and an absolute-form target beside any Host. A proxy
forwards to a server that may read the same bytes differently, so each of these is refused
with 400 before any byte goes upstream (James Kettle, "HTTP/1.1 must die", 2025). Sans-IO:
the raw head and the parsed facts in, the reason to refuse out.
"""

from __future__ import annotations

import re

_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding:([^\r\n]*)", re.IGNORECASE)
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)


def ambiguity(
    head: bytes,
    version: bytes,
    target: bytes,
    *,
    host: bytes | None,
    has_transfer_encoding: bool,
) -> str | None:
    """Why this request must be refused, or None. The fields' facts come from the parsed
    headers, as the front end's one pass over them found them."""
    if has_transfer_encoding:
        if version != b"1.1":
            return "Transfer-Encoding in an HTTP/1.0 request"
        for value in _TRANSFER_ENCODING.findall(head):
            if value not in (b"chunked", b" chunked"):
                return f"Transfer-Encoding {value.strip()!r} is not exactly chunked"
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute is not None and host is not None and absolute[1].lower() != host.lower():
        return "absolute-form target names another host than Host"
    return None
