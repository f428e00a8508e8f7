"""HTTP/2 header blocks to requests: what is forwarded, and what is malformed (RFC 9113 §8)."""

from __future__ import annotations

import pytest

from proxy.http.h2_fields import Malformed, request_from_headers, trailers_from_headers

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1")]


def test_request_translation() -> None:
    fields = [
        *BASE,
        (b":authority", b"example.test:8443"),
        (b"cookie", b"a=1"),
        (b"accept", b"*/*"),
        (b"cookie", b"b=2"),
        (b"te", b"trailers"),
    ]
    request = request_from_headers(fields, True, "192.0.2.1")
    assert (request.method, request.target, request.host) == (
        b"GET",
        b"/a?b=1",
        b"example.test:8443",
    )
    assert request.headers == [(b"accept", b"*/*"), (b"te", b"trailers"), (b"cookie", b"a=1; b=2")]
    assert (request.http_version, request.has_body, request.client_ip) == (b"2", False, "192.0.2.1")


def test_host_stands_in_for_a_missing_authority() -> None:
    request = request_from_headers([*BASE, (b"host", b"example.test")], False, "::1")
    assert (request.host, request.headers, request.has_body) == (b"example.test", [], True)


@pytest.mark.parametrize(
    ("fields", "target"),
    [
        ([(b":method", b"OPTIONS"), (b":scheme", b"https"), (b":path", b"*")], b"*"),
        ([(b":method", b"CONNECT"), (b":authority", b"example.test:443")], b"example.test:443"),
    ],
)
def test_asterisk_and_authority_form_targets(
    fields: list[tuple[bytes, bytes]], target: bytes
) -> None:
    assert request_from_headers(fields, True, "::1").target == target


@pytest.mark.parametrize(
    "fields",
    [
        [(b":scheme", b"https"), (b":path", b"/")],  # no :method
        [(b":method", b"GET"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":scheme", b"https")],  # no :path
        [*BASE, (b":path", b"/again")],
        [*BASE, (b":status", b"200")],
        [*BASE, (b":protocol", b"websocket")],
        [(b":method", b"GET"), (b"accept", b"*/*"), (b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"G T"), (b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"relative")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a b")],
        [*BASE, (b":authority", b"a b")],
        [*BASE, (b":authority", b"a.test"), (b"host", b"b.test")],
        [*BASE, (b"host", b"a.test"), (b"host", b"a.test")],
        [*BASE, (b"Accept", b"*/*")],
        [*BASE, (b"x:y", b"1")],
        [*BASE, (b"x-a", b" padded")],
        [*BASE, (b"x-a", b"a\x00b")],
        [*BASE, (b"x-a", b"a\nb")],
        [*BASE, (b"connection", b"keep-alive")],
        [*BASE, (b"keep-alive", b"5")],
        [*BASE, (b"proxy-connection", b"keep-alive")],
        [*BASE, (b"transfer-encoding", b"chunked")],
        [*BASE, (b"upgrade", b"h2c")],
        [*BASE, (b"te", b"gzip")],
        # What an HTTP/1.1 upstream could not be sent, refused as the same request over
        # HTTP/1.1 would be:
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", "/caf\u00e9".encode())],
        [*BASE, (b"content-length", b"1")],  # with END_STREAM: a body that never comes
        [*BASE, (b"content-length", b"0x1")],
        [*BASE, (b"content-length", b"-1")],
        [*BASE, (b"content-length", b"1, 1")],
        [*BASE, (b"content-length", b"0"), (b"content-length", b"1")],
    ],
)
def test_malformed_requests(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        request_from_headers(fields, True, "::1")


def test_content_length_with_a_body_to_come() -> None:
    fields = [*BASE, (b"content-length", b"5"), (b"content-length", b"5")]
    request = request_from_headers(fields, False, "::1")
    assert request.has_body and request.headers == fields[3:]
    assert not request_from_headers([*BASE, (b"content-length", b"0")], True, "::1").has_body


def test_trailers() -> None:
    assert trailers_from_headers([(b"grpc-status", b"0")]) == [(b"grpc-status", b"0")]
    for bad in ([(b":status", b"200")], [(b"X-A", b"1")], [(b"connection", b"close")]):
        with pytest.raises(Malformed):
            trailers_from_headers(bad)
