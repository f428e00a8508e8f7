"""What h11 tolerates in a request head and a proxy must refuse (request smuggling).

h11 parses leniently where RFC 9112 lets a lone recipient be lenient: it unfolds obs-fold
lines, accepts bare LF line endings, lets Transfer-Encoding win over Content-Length and
normalises "CHUNKED" or " \\tchunked" to chunked. A proxy forwards to a server that may read
the same bytes differently, so each of these is refused with 400 before any byte goes
upstream (James Kettle, "HTTP/1.1 must die", 2025). Sans-IO: the raw head and h11's event in,
the reason to refuse out.
"""

from __future__ import annotations

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
_OBS_FOLD = re.compile(rb"\n[ \t]")
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding:([^\r\n]*)", re.IGNORECASE)
_HEAD_END = re.compile(rb"\n\r?\n")
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)


def has_bare_lf(data: bytes) -> bool:
    return _BARE_LF.search(data) is not None


def head_of(raw: bytes) -> bytes:
    """The request head at the start of `raw`, up to its blank line as h11 finds it."""
    end = _HEAD_END.search(raw)
    return raw if end is None else raw[: end.end()]


def ambiguity(
    head: bytes,
    version: bytes,
    target: bytes,
    *,
    host: bytes | None,
    has_length: bool,
    has_transfer_encoding: bool,
) -> str | None:
    """Why this request must be refused, or None. The fields' facts come from h11's parsed
    headers, as the front end's one pass over them found them."""
    if has_bare_lf(head):
        return "bare LF line ending"
    if _OBS_FOLD.search(head):
        return "obs-fold header continuation line"
    if has_transfer_encoding:
        if has_length:
            return "both Content-Length and Transfer-Encoding"
        if version != b"1.1":
            return "Transfer-Encoding in an HTTP/1.0 request"
        for value in _TRANSFER_ENCODING.findall(head):
            if value not in (b"chunked", b" chunked"):
                return f"Transfer-Encoding {value.strip()!r} is not exactly chunked"
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute is not None and host is not None and absolute[1].lower() != host.lower():
        return "absolute-form target names another host than Host"
    return None
