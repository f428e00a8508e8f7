"""The plain-HTTP port: 308 to https with host, path and query kept; 400 on a bad Host."""

from __future__ import annotations

import socket

import pytest

from proxy.handlers.redirect import https_location
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess


async def _raw(proxy: ProxyProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
async def test_redirect_keeps_host_path_and_query(proxy: ProxyProcess) -> None:
    url = f"http://localhost:{proxy.http_port}/a/b?c=d&e=%20f"
    reply = await curl(url)
    lines = reply.head
    assert lines[0] == "HTTP/1.1 308 Permanent Redirect"
    assert f"location: https://localhost:{proxy.https_port}/a/b?c=d&e=%20f" in lines
    assert f"content-length: {len(reply.body)}" in lines
    assert "connection: close" in lines
    assert not any(line.lower().startswith("strict-transport-security") for line in lines)


@pytest.mark.slow
async def test_redirect_followed_by_curl_reaches_the_backend(proxy: ProxyProcess) -> None:
    reply = await curl(
        "-L", "--cacert", str(proxy.root_ca), "-w", "%{http_code} %{url_effective}",
        "-o", "/dev/null", f"http://localhost:{proxy.http_port}/echo?x=1",
    )  # fmt: skip
    assert reply.body.decode() == f"200 https://localhost:{proxy.https_port}/echo?x=1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ],
)
async def test_missing_or_malformed_host_is_400(proxy: ProxyProcess, request_bytes: bytes) -> None:
    reply = await _raw(proxy, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.slow
async def test_acme_challenge_path_is_not_redirected(proxy: ProxyProcess) -> None:
    reply = await _raw(
        proxy, b"GET /.well-known/acme-challenge/unknown HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")


@pytest.mark.parametrize(
    ("host", "target", "port", "expected"),
    [
        (b"Example.TEST:80", b"/x?y", 443, b"https://example.test/x?y"),
        (b"example.test", b"/", 8443, b"https://example.test:8443/"),
        (b"[::1]:8080", b"/p", 443, b"https://[::1]/p"),
        (b"example.test", b"http://example.test/abs?q", 443, b"https://example.test/abs?q"),
        (b"example.test", b"*", 443, b"https://example.test/"),
        (b"", b"/", 443, None),
        (b"exa mple", b"/", 443, None),
    ],
)
def test_https_location(host: bytes, target: bytes, port: int, expected: bytes | None) -> None:
    assert https_location(host, target, port) == expected
