"""The header policy (RFC 9110 §7.6) and each upstream protocol's framing, in-process."""

from __future__ import annotations

import base64

from proxy.http.headers import client_response_headers, requested_upgrade, upstream_request
from proxy.http.model import Request, UpstreamRequest
from proxy.upstream.h1 import h1_fields
from proxy.upstream.h2 import request_fields


def forwarded(request: Request) -> UpstreamRequest:
    """The upstream request for a peer that is no trusted proxy."""
    return upstream_request(request, keep_forwarded=False)


def request(*headers: tuple[bytes, bytes], has_body: bool = False) -> Request:
    return Request(
        method=b"POST",
        target=b"/p?q",
        host=b"example.test",
        headers=list(headers),
        http_version=b"1.1",
        has_body=has_body,
        client_ip="192.0.2.7",
    )


def test_hop_by_hop_dropped_forwarding_fields_added() -> None:
    outgoing = upstream_request(
        request(
            (b"accept", b"*/*"),
            (b"connection", b"x-private, keep-alive"),
            (b"x-private", b"secret"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-authorization", b"Basic x"),
            (b"proxy-whatever", b"1"),
            (b"trailer", b"x-t"),
            (b"expect", b"100-continue"),
            (b"x-forwarded-for", b"198.51.100.1"),
            (b"x-forwarded-proto", b"http"),
            (b"via", b"1.0 other"),
        ),
        keep_forwarded=False,
    )
    assert outgoing.authority == b"example.test"
    assert outgoing.fields == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"192.0.2.7"),  # the peer is no trusted proxy: replaced
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"example.test"),
        (b"forwarded", b"for=192.0.2.7;proto=https;host=example.test"),
        (b"via", b"1.0 other, 1.1 port443"),
    ]


def test_te_is_reduced_to_trailers() -> None:
    with_trailers = forwarded(request((b"te", b"gzip, trailers;q=1")))
    assert (b"te", b"trailers") in with_trailers.fields
    assert not any(name == b"te" for name, _ in forwarded(request((b"te", b"gzip"))).fields)


def test_each_upstream_protocol_frames_the_body_its_own_way() -> None:
    known = upstream_request(
        request((b"content-length", b"12"), has_body=True), keep_forwarded=False
    )
    unknown = upstream_request(
        request((b"transfer-encoding", b"chunked"), has_body=True), keep_forwarded=False
    )
    assert (known.body_length, unknown.body_length) == (12, None)
    assert not any(name in (b"content-length", b"transfer-encoding") for name, _ in known.fields)
    h1_known, h1_unknown = h1_fields(known), h1_fields(unknown)
    assert h1_known[0] == (b"host", b"example.test")
    assert (b"content-length", b"12") in h1_known
    assert not any(name == b"transfer-encoding" for name, _ in h1_known)
    assert (b"transfer-encoding", b"chunked") in h1_unknown
    h2_known, h2_unknown = request_fields(known, b"https"), request_fields(unknown, b"https")
    assert h2_known[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"example.test"),
        (b":path", b"/p?q"),
    ]
    assert (b"content-length", b"12") in h2_known
    assert not any(name in (b"transfer-encoding", b"host") for name, _ in h2_unknown)


def test_an_upgrade_is_asked_over_http1_only() -> None:
    headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    asked = request(*headers)
    asked.upgrade = requested_upgrade(asked.headers)
    outgoing = upstream_request(asked, keep_forwarded=False)
    assert outgoing.upgrade == b"websocket" and outgoing.fields[0][0] == b"x-forwarded-for"
    h1 = h1_fields(outgoing)
    assert h1[-3:-1] == [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    # The client sent no Sec-WebSocket-Key (as over HTTP/2's extended CONNECT): one is made.
    assert h1[-1][0] == b"sec-websocket-key" and len(base64.b64decode(h1[-1][1])) == 16
    keyed = upstream_request(
        request(*headers, (b"sec-websocket-key", b"a2V5a2V5a2V5a2V5a2V5aw==")), keep_forwarded=False
    )
    keyed.upgrade = b"websocket"
    assert [v for n, v in h1_fields(keyed) if n == b"sec-websocket-key"] == [
        b"a2V5a2V5a2V5a2V5a2V5aw=="
    ]
    assert not any(
        name in (b"connection", b"upgrade") for name, _ in request_fields(outgoing, b"http")
    )


def test_response_headers_for_the_client() -> None:
    hsts = b"max-age=63072000"
    added = [(b"strict-transport-security", hsts)]
    headers = client_response_headers(
        [(b"connection", b"close"), (b"content-type", b"text/plain"), (b"via", b"1.1 app")],
        b"1.1",
        added,
    )
    assert headers == [
        (b"content-type", b"text/plain"),
        (b"via", b"1.1 app, 1.1 port443"),
        (b"strict-transport-security", hsts),
    ]
    own = [(b"strict-transport-security", b"max-age=1")]
    assert client_response_headers(own, b"2", added) == [*own, (b"via", b"2 port443")]
