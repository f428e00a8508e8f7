"""Response compression's decisions and encoders, in process (proxy/http/encoding.py), and
its configuration keys."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import brotli
import pytest
import zstandard

from proxy import config_load
from proxy.config import Coding, Config, Encode, UpstreamGroup
from proxy.config_load import ConfigError
from proxy.http.encoding import (
    IDENTITY,
    Encoder,
    accepted_codings,
    compressible,
    negotiate,
    response_coder,
)
from proxy.http.model import Headers, ResponseHead

ALL: tuple[Coding, ...] = ("zstd", "br", "gzip")
ON = Encode(codings=ALL, min_size=1024)
TEXT = (b"content-type", b"text/html; charset=utf-8")


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        (b"gzip, deflate, br, zstd", ALL, "zstd"),  # a browser's: the server's order decides
        (b"gzip, deflate, br, zstd", ("gzip", "br"), "gzip"),
        (b"br;q=0.5, gzip;q=0.9", ALL, "gzip"),  # the client's qvalues first
        (b"zstd;q=0.5, br;q=0.5", ("br", "zstd"), "br"),  # a tie: the server's order
        (b"*", ALL, "zstd"),
        (b"*;q=0.1, gzip", ALL, "gzip"),
        (b"*, zstd;q=0", ALL, "br"),  # named q=0 refuses even under *
        (b"GZIP", ALL, "gzip"),  # case-insensitive
        (b"x-gzip", ALL, "gzip"),  # the RFC 9110 alias
        (b"identity", ALL, None),
        (b"identity;q=0", ALL, None),  # identity stays the fallback: no 406
        (b"identity;q=0, *;q=0", ALL, None),
        (b"deflate", ALL, None),  # not one we make
        (b"gzip;q=0", ALL, None),
        (b"gzip;q=0.000", ALL, None),
        (b"gzip;q=1.5, br", ALL, "br"),  # an invalid qvalue drops its element
        (b"gzip;q=0.1234, br;q=0.1", ALL, "br"),  # four decimals: invalid
        (b"gzip;q=nan", ALL, None),
        (b"gzip ; Q=0.5 , br;q=0.4", ALL, "gzip"),  # whitespace, upper-case q
        (b", ,gzip,", ALL, "gzip"),  # empty elements
        (b"", ALL, None),
        (None, ALL, None),  # no Accept-Encoding: not compressed
        (b"gzip", (), None),
    ],
)
def test_negotiation(accept: bytes | None, offered: tuple[Coding, ...], chosen: str) -> None:
    assert negotiate(accept, offered) == chosen


def test_accepted_codings_reads_qvalues() -> None:
    assert accepted_codings(b"gzip;q=0.8, br, zstd;q=0") == {
        b"gzip": 0.8,
        b"br": 1.0,
        b"zstd": 0.0,
    }


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"text/html; charset=utf-8", True),
        (b"TEXT/CSS", True),
        (b"text/event-stream", True),
        (b"application/json", True),
        (b"application/problem+json", True),
        (b"application/javascript; charset=utf-8", True),
        (b"application/wasm", True),
        (b"image/svg+xml", True),
        (b"application/atom+xml", True),
        (b"font/ttf", True),
        (b"application/grpc+json", False),
        (b"application/grpc-web+json", False),
        (b"image/png", False),
        (b"image/jpeg", False),
        (b"font/woff2", False),
        (b"application/octet-stream", False),
        (b"application/zip", False),
        (b"video/mp4", False),
        (b"", False),
    ],
)
def test_compressible_types(content_type: bytes, expected: bool) -> None:
    assert compressible(content_type) is expected


def _coder(
    headers: Headers,
    *,
    status: int = 200,
    method: bytes = b"GET",
    accept: bytes | None = b"gzip, br, zstd",
    encode: Encode = ON,
) -> tuple[object, Headers]:
    head = ResponseHead(status, list(headers))
    request: Headers = [(b"accept-encoding", accept)] if accept is not None else []
    coder = response_coder(method=method, request_headers=request, head=head, encode=encode)
    return coder, head.headers


def test_a_compressed_head() -> None:
    coder, headers = _coder(
        [
            TEXT,
            (b"content-length", b"5000"),
            (b"etag", b'"abc"'),
            (b"accept-ranges", b"bytes"),
            (b"vary", b"Origin"),
            (b"x-other", b"1"),
        ]
    )
    assert isinstance(coder, Encoder)
    assert headers == [
        TEXT,
        (b"etag", b'W/"abc"'),
        (b"x-other", b"1"),
        (b"vary", b"Origin, Accept-Encoding"),
        (b"content-encoding", b"zstd"),
    ]


def test_a_weak_etag_and_vary_already_naming_accept_encoding_are_kept() -> None:
    _, headers = _coder([TEXT, (b"etag", b'W/"x"'), (b"vary", b"accept-encoding")])
    assert (b"etag", b'W/"x"') in headers
    assert [value for name, value in headers if name == b"vary"] == [b"accept-encoding"]


def test_several_vary_fields_become_one() -> None:
    _, headers = _coder([TEXT, (b"vary", b"Origin"), (b"vary", b"Cookie")])
    assert [value for name, value in headers if name == b"vary"] == [
        b"Origin, Cookie, Accept-Encoding"
    ]


def test_vary_star_is_left_alone() -> None:
    _, headers = _coder([TEXT, (b"vary", b"*")])
    assert [value for name, value in headers if name == b"vary"] == [b"*"]


def test_not_accepted_keeps_the_body_but_says_vary() -> None:
    """A cache must not hand this identity response to a client that accepts gzip."""
    original = [TEXT, (b"content-length", b"5000"), (b"etag", b'"abc"')]
    for accept in (None, b"identity", b"deflate"):
        coder, headers = _coder(original, accept=accept)
        assert coder is IDENTITY
        assert headers == [*original, (b"vary", b"Accept-Encoding")]


def test_head_requests_keep_their_length_but_say_vary() -> None:
    original = [TEXT, (b"content-length", b"5000")]
    coder, headers = _coder(original, method=b"HEAD")
    assert coder is IDENTITY and headers == [*original, (b"vary", b"Accept-Encoding")]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, [(b"content-type", b"image/png")]),
        (200, []),  # no Content-Type
        (200, [TEXT, (b"content-length", b"1023")]),  # below encode_min_size
        (200, [TEXT, (b"content-encoding", b"gzip")]),  # already encoded
        (200, [TEXT, (b"content-encoding", b"identity")]),
        (200, [TEXT, (b"content-range", b"bytes 0-9/5000")]),
        (206, [TEXT]),
        (204, [TEXT]),
        (304, [TEXT]),
        (200, [TEXT, (b"cache-control", b"public, No-Transform")]),
    ],
)
def test_responses_never_compressed(status: int, headers: Headers) -> None:
    coder, out = _coder(headers, status=status)
    assert coder is IDENTITY and out == headers  # not even Vary: no variant exists


def test_unknown_length_and_the_minimum_size() -> None:
    assert isinstance(_coder([TEXT])[0], Encoder)  # chunked: compressed
    assert isinstance(_coder([TEXT, (b"content-length", b"1024")])[0], Encoder)
    small = Encode(codings=ALL, min_size=0)
    assert isinstance(_coder([TEXT, (b"content-length", b"1")], encode=small)[0], Encoder)
    assert _coder([TEXT], encode=Encode())[0] is IDENTITY  # encode off


DECODERS = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress,
    "br": lambda: brotli.Decompressor().process,
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj().decompress,
}


@pytest.mark.parametrize("coding", ALL)
def test_encoder_streams_and_flushes(coding: Coding) -> None:
    """Everything fed before a flush decodes from what came out so far (a slow stream
    reaches the client); without a flush little or nothing comes out."""
    encoder = Encoder(coding)
    decode = DECODERS[coding]()
    first = b"data: first event\n\n"
    assert decode(encoder.feed(first, flush=True, end=False)) == first
    assert encoder.feed(b"", flush=True, end=False) == b""  # nothing new: no flush bytes
    held = encoder.feed(b"data: second\n\n", flush=False, end=False)
    rest = encoder.feed(b"data: last\n\n", flush=False, end=True)
    assert decode(held + rest) == b"data: second\n\ndata: last\n\n"
    assert encoder.feed(b"", flush=True, end=True) == b""  # ended: nothing more


def test_gzip_output_is_a_gzip_member() -> None:
    body = b"hello " * 1000
    encoder = Encoder("gzip")
    out = encoder.feed(body, flush=True, end=False) + encoder.feed(b"", flush=False, end=True)
    assert gzip.decompress(out) == body and len(out) < len(body) // 10


def test_identity_passes_bytes_through() -> None:
    assert IDENTITY.feed(b"abc", flush=True, end=True) == b"abc"


def _load(body: str, tmp_path: Path) -> Config:
    path = tmp_path / "port443.toml"
    path.write_text(body)
    return config_load.load_config(path)


SITE = '[[sites]]\nhosts = ["a.test"]\n'


def test_encode_on_sites_and_routes(tmp_path: Path) -> None:
    config = _load(
        SITE + 'upstreams = ["http://127.0.0.1:1"]\nencode = ["br", "gzip"]\n'
        "encode_min_size = 10\n"
        '[[sites.routes]]\npath_prefix = "/a"\nupstreams = ["http://127.0.0.1:2"]\n'
        '[[sites.routes]]\npath_prefix = "/b"\nupstreams = ["http://127.0.0.1:2"]\n'
        'encode = ["zstd"]\n'
        '[[sites.routes]]\npath_prefix = "/c"\nupstreams = ["http://127.0.0.1:2"]\nencode = []\n'
        '[[sites.routes]]\npath_prefix = "/d"\nredirect = "/"\n',
        tmp_path,
    )
    site = config.sites[0]
    inherited = Encode(codings=("br", "gzip"), min_size=10)
    assert site.encode == inherited and site.own_route.encode == inherited
    assert isinstance(site.own_route.action, UpstreamGroup)
    assert [route.encode for route in site.routes] == [
        inherited,
        Encode(codings=("zstd",), min_size=10),
        Encode(codings=(), min_size=10),
        inherited,  # unused by a redirect
    ]
    plain = _load(SITE + 'upstreams = ["http://127.0.0.1:1"]\n', tmp_path).sites[0]
    assert plain.encode == Encode() and not plain.encode.codings  # off by default


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('encode = ["deflate"]', 'encode: must be one of "zstd", "br", "gzip"'),
        ('encode = ["gzip", "gzip"]', "encode: must not repeat a value"),
        ('encode = "gzip"', "encode: must be a non-empty array"),
        ('encode = ["gzip"]\nencode_min_size = -1', "encode_min_size: must be an integer >= 0"),
        ("encode_min_size = 10", "encode_min_size: is only used with encode"),
    ],
)
def test_encode_errors(tmp_path: Path, keys: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(SITE + f'upstreams = ["http://127.0.0.1:1"]\n{keys}\n', tmp_path)


def test_encode_on_a_route_that_does_not_forward(tmp_path: Path) -> None:
    body = SITE + '[[sites.routes]]\npath = "/"\nrespond = {}\nencode = ["gzip"]\n'
    with pytest.raises(ConfigError, match=r"routes\[0\]\.encode: is only used with upstreams"):
        _load(body, tmp_path)
