"""Response compression (a route's `encode`): which coding a response gets, and its encoder.

Sans-IO. `response_coder` decides from the request and the response head whether the body
is compressed (a compressible type, not too small, not already encoded, not a range or a
HEAD answer, no `no-transform`, a coding the client accepts), edits the head to match, and
returns the body's coder. The forwarder feeds it each upstream chunk as it arrives and sends
what it returns: a response is never held whole. It flushes when the forwarder would
otherwise wait for the upstream, so a slow stream (server-sent events) still reaches the
client as it is written, and a fast one is flushed about once per read.

Levels are the cheap ends of each format, as Caddy and nginx choose (`bench/encoding.py`
measures the CPU per MB): gzip 5; brotli 4 with a 512 KiB window (lgwin 19, nginx's default);
zstd 3 (its default; a 2 MiB window, within the 8 MiB that RFC 9659 allows the zstd
content coding: browsers refuse larger ones).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from functools import partial
from typing import Protocol

import brotli
import zstandard

from proxy.config import Coding, Encode
from proxy.http.model import Headers, ResponseHead

GZIP_LEVEL = 5
BROTLI_QUALITY = 4
BROTLI_WINDOW_BITS = 19
ZSTD_LEVEL = 3

# Compressible beyond text/*, +json and +xml: scripts, data, wasm, uncompressed fonts, icons.
COMPRESSIBLE_TYPES = frozenset(
    (
        b"application/javascript",
        b"application/x-javascript",
        b"application/ecmascript",
        b"application/json",
        b"application/x-ndjson",
        b"application/xml",
        b"application/wasm",
        b"application/toml",
        b"application/yaml",
        b"application/x-yaml",
        b"application/graphql",
        b"application/vnd.ms-fontobject",
        b"font/ttf",
        b"font/otf",
        b"image/bmp",
        b"image/x-icon",
        b"image/vnd.microsoft.icon",
    )
)
_QVALUE = re.compile(rb"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_ALIASES = {b"x-gzip": b"gzip"}  # RFC 9110 §8.4.1.3
_NO_BODY_STATUSES = (204, 206, 304)


def accepted_codings(accept_encoding: bytes) -> dict[bytes, float]:
    """Accept-Encoding -> {coding: qvalue}, lower-case; an element whose qvalue is not one
    (RFC 9110 §12.4.2: 0 to 1, three decimals at most) is ignored."""
    accepted: dict[bytes, float] = {}
    for element in accept_encoding.split(b","):
        coding, *params = (part.strip() for part in element.split(b";"))
        if not coding:
            continue
        quality: float | None = 1.0
        for param in params:
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                value = value.strip()
                quality = float(value) if _QVALUE.fullmatch(value) else None
        if quality is not None:
            coding = coding.lower()
            accepted[_ALIASES.get(coding, coding)] = quality
    return accepted


def negotiate(accept_encoding: bytes | None, offered: tuple[Coding, ...]) -> Coding | None:
    """The coding to use: the client's highest qvalue, ties to the earliest in `offered` (the
    server's preference); `*` stands for codings the client does not name; q=0 refuses.
    None: identity. Without Accept-Encoding nothing is compressed (as nginx and Caddy do,
    though RFC 9110 would allow any coding), and identity stays the fallback even when
    refused (`identity;q=0`): a 406 helps no client."""
    if not accept_encoding:
        return None
    accepted = accepted_codings(accept_encoding)
    anything = accepted.get(b"*", 0.0)
    best: Coding | None = None
    best_quality = 0.0
    for coding in offered:
        quality = accepted.get(coding.encode("ascii"), anything)
        if quality > best_quality:
            best, best_quality = coding, quality
    return best


def compressible(content_type: bytes) -> bool:
    """Whether a media type is worth compressing: text, JSON, XML (SVG too), scripts... Never
    gRPC (`application/grpc+json` too): it compresses its messages itself (grpc-encoding),
    and its clients do not decode a Content-Encoding."""
    media = content_type.partition(b";")[0].strip().lower()
    if media.startswith(b"application/grpc"):
        return False
    return (
        media.startswith(b"text/")
        or media.endswith((b"+json", b"+xml"))
        or media in COMPRESSIBLE_TYPES
    )


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    """The comma-separated elements of every `name` field, lower-case."""
    return [
        token.strip().lower()
        for field, value in headers
        if field == name
        for token in value.split(b",")
    ]


def _eligible(head: ResponseHead, min_size: int) -> bool:
    """Whether the response itself may be compressed, whoever asks for it."""
    content_type = None
    for name, value in head.headers:
        if name in (b"content-encoding", b"content-range"):
            return False
        if name == b"content-length" and value.isdigit() and int(value) < min_size:
            return False
        if name == b"content-type":
            content_type = value
    return (
        head.status >= 200
        and head.status not in _NO_BODY_STATUSES
        and content_type is not None
        and compressible(content_type)
        and b"no-transform" not in _tokens(head.headers, b"cache-control")
    )


def _with_vary(headers: Headers) -> Headers:
    """`Vary: Accept-Encoding` merged into the response's Vary (one field)."""
    varies = _tokens(headers, b"vary")
    if b"*" in varies or b"accept-encoding" in varies:
        return headers
    existing = b", ".join(value for name, value in headers if name == b"vary")
    merged = existing + b", Accept-Encoding" if existing else b"Accept-Encoding"
    return [(name, value) for name, value in headers if name != b"vary"] + [(b"vary", merged)]


def _encoded_fields(headers: Headers, coding: Coding) -> Headers:
    """The head of the encoded response: no Content-Length (chunked, or h2 DATA until the
    end), no byte ranges of it offered, a strong ETag weakened (the bytes differ but the
    content is the same, as nginx does), and its Content-Encoding."""
    fields: Headers = []
    for name, value in headers:
        if name in (b"content-length", b"accept-ranges"):
            continue
        if name == b"etag" and not value.startswith(b"W/"):
            value = b"W/" + value
        fields.append((name, value))
    fields.append((b"content-encoding", coding.encode("ascii")))
    return fields


class BodyCoder(Protocol):
    """What the forwarder passes each piece of a response body through."""

    __slots__ = ()

    def feed(self, data: bytes, *, flush: bool, end: bool) -> bytes:
        """`data` coded. `flush`: the caller is about to wait, so emit everything fed so far;
        `end`: the body is complete (later calls return b"")."""
        ...


class Identity:
    """The body as it is."""

    __slots__ = ()

    def feed(self, data: bytes, *, flush: bool, end: bool) -> bytes:
        return data


IDENTITY = Identity()

Codec = tuple[Callable[[bytes], bytes], Callable[[], bytes], Callable[[], bytes]]


def _codec(coding: Coding) -> Codec:
    """A new stream of `coding`: its compress, flush and finish functions."""
    if coding == "gzip":
        gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return gzip.compress, partial(gzip.flush, zlib.Z_SYNC_FLUSH), gzip.flush
    if coding == "br":
        br = brotli.Compressor(quality=BROTLI_QUALITY, lgwin=BROTLI_WINDOW_BITS)
        return br.process, br.flush, br.finish
    zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    return zstd.compress, partial(zstd.flush, zstandard.COMPRESSOBJ_FLUSH_BLOCK), zstd.flush


class Encoder:
    """One response body compressed as a stream."""

    __slots__ = ("_compress", "_ended", "_finish", "_flush", "_unflushed")

    def __init__(self, coding: Coding) -> None:
        self._compress, self._flush, self._finish = _codec(coding)
        self._unflushed = False  # input given since the last flush
        self._ended = False

    def feed(self, data: bytes, *, flush: bool, end: bool) -> bytes:
        if self._ended:
            return b""
        out = self._compress(data) if data else b""
        if end:
            self._ended = True
            return out + self._finish()
        self._unflushed = self._unflushed or bool(data)
        if flush and self._unflushed:
            self._unflushed = False
            return out + self._flush()
        return out


def response_coder(
    *, method: bytes, request_headers: Headers, head: ResponseHead, encode: Encode
) -> BodyCoder:
    """The coder of this response's body, `head.headers` edited to match. A response that
    could be compressed says `Vary: Accept-Encoding` whether or not this client gets it
    compressed, so that caches keep the variants apart."""
    if not encode.codings or not _eligible(head, encode.min_size):
        return IDENTITY
    head.headers = _with_vary(head.headers)
    if method == b"HEAD":
        return IDENTITY  # its Content-Length describes the identity body: leave it true
    accept = b", ".join(value for name, value in request_headers if name == b"accept-encoding")
    coding = negotiate(accept, encode.codings)
    if coding is None:
        return IDENTITY
    head.headers = _encoded_fields(head.headers, coding)
    return Encoder(coding)
