"""HTTP/1.1 through the real proxy process, with curl as the client and a real backend."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.tls import client_context, tls_socket

pytestmark = pytest.mark.slow


async def h1(proxy: ProxyProcess, path: str, *extra: str, host: str = "localhost") -> Reply:
    return await curl("--http1.1", *extra, *proxy.curl_args(path, host))


async def test_get_through_proxy_carries_forwarded_headers_and_hsts(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/echo?q=1", "-H", "X-Forwarded-For: 203.0.113.9")
    assert reply.head[0] == "HTTP/1.1 200 OK"
    assert reply.header("strict-transport-security") == "max-age=63072000; includeSubDomains"
    assert reply.header("via") == "1.1 port443"
    seen = json.loads(reply.body)
    assert seen["target"] == "/echo?q=1"
    h = seen["headers"]
    assert h["host"] == f"localhost:{proxy.https_port}"
    assert h["x-forwarded-for"] == "127.0.0.1"  # no trusted_proxies: the sent value is replaced
    assert h["x-forwarded-proto"] == "https"
    assert h["x-forwarded-host"] == f"localhost:{proxy.https_port}"
    assert h["via"] == "1.1 port443"


async def test_hop_by_hop_headers_are_not_forwarded(proxy: ProxyProcess) -> None:
    reply = await h1(
        proxy, "/echo", "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1",
        "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Authorization: Basic eA==",
        "-H", "TE: gzip, trailers", "-H", "X-Kept: yes",
    )  # fmt: skip
    h = json.loads(reply.body)["headers"]
    for name in ("connection", "x-secret", "keep-alive", "proxy-authorization"):
        assert name not in h, name
    assert h["te"] == "trailers"  # only the token saying trailers are welcome goes on
    assert h["x-kept"] == "yes"


async def test_upstream_hsts_is_kept(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/hsts")
    values = [line for line in reply.head if line.lower().startswith("strict-transport-security")]
    assert values == ["strict-transport-security: max-age=5"]


async def test_keep_alive_reuses_client_and_upstream_connections(
    proxy: ProxyProcess, backend: Backend
) -> None:
    urls = [proxy.url(f"/echo?n={i}") for i in range(5)]
    reply = await h1(proxy, "/echo?n=first", "-v", *urls)  # six requests, one connection
    assert reply.stderr.count(b"Re-using existing connection") == 5
    assert backend.connections == 1


async def test_head_204_and_304_have_no_body(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/bytes/1000", "-I")
    assert reply.head[0] == "HTTP/1.1 200 OK" and reply.header("content-length") == "1000"
    assert reply.body.partition(b"\r\n\r\n")[2] == b""  # -I prints the head, then nothing
    for status in ("204", "304"):
        reply = await h1(proxy, f"/status/{status}")
        assert reply.head[0].startswith(f"HTTP/1.1 {status}") and reply.body == b""


async def test_chunked_response_and_upload(proxy: ProxyProcess, tmp_path: Path) -> None:
    reply = await h1(proxy, "/chunked/200000")
    assert reply.body == b"x" * 200000
    payload = tmp_path / "payload"
    payload.write_bytes(b"abc" * 100000)
    reply = await h1(
        proxy, "/upload", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}"
    )
    assert json.loads(reply.body)["length"] == 300000


async def test_expect_100_continue_upload(proxy: ProxyProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"z" * 2_000_000)
    reply = await h1(
        proxy, "/upload", "-v", "-H", "Expect: 100-continue", "--expect100-timeout", "20",
        "--data-binary", f"@{payload}",
    )  # fmt: skip
    assert b"HTTP/1.1 100 Continue" in reply.stderr
    assert json.loads(reply.body)["length"] == 2_000_000


async def test_early_hints_are_relayed(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/hints")
    assert reply.heads[0][:2] == ["HTTP/1.1 103 Early Hints", "link: </a.css>; rel=preload"]
    assert reply.head[0] == "HTTP/1.1 200 OK"


async def test_early_response_to_upload_is_delivered(proxy: ProxyProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"q" * 20_000_000)
    reply = await h1(proxy, "/early/413", "--data-binary", f"@{payload}")
    assert reply.head[0] == "HTTP/1.1 413 Request Entity Too Large"


async def test_unknown_host_is_misdirected(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/echo", "-H", "Host: other.test")
    assert reply.head[0] == "HTTP/1.1 421 Misdirected Request"


async def test_upstream_down_gives_502_and_proxy_keeps_serving(
    tmp_path: Path, backend: Backend
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connections are refused
        body = sites_toml(
            (["localhost"], [f"http://127.0.0.1:{dead}"]), (["alive.test"], [backend.url])
        )
        proxy = await start_proxy(tmp_path, body)
        try:
            reply = await h1(proxy, "/echo")
            assert reply.head[0] == "HTTP/1.1 502 Bad Gateway"
            assert reply.body == b"upstream unavailable\n"
            assert f"site localhost: upstream unavailable: http://127.0.0.1:{dead}" in proxy.log()
            alive = await h1(proxy, "/echo", "-k", host="alive.test")
            assert json.loads(alive.body)["target"] == "/echo"
        finally:
            await proxy.terminate()


async def test_upstream_stall_gives_504(tmp_path: Path, backend: Backend) -> None:
    body = "[limits]\nupstream_timeout = 1\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        reply = await h1(proxy, "/stall")
        assert reply.head[0] == "HTTP/1.1 504 Gateway Timeout"
        assert "upstream timed out" in proxy.log()
        reply = await h1(proxy, "/echo")
        assert reply.head[0] == "HTTP/1.1 200 OK"
    finally:
        await proxy.terminate()


async def test_oversized_header_gives_431(proxy: ProxyProcess) -> None:
    reply = await h1(proxy, "/echo", "-H", "X-Big: " + "a" * 100 * 1024)
    assert reply.head[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert reply.header("connection") == "close"


async def test_malformed_request_gives_400(proxy: ProxyProcess) -> None:
    tls = tls_socket(proxy)
    with tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n")
        reply = tls.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_slow_header_client_is_cut_off(tmp_path: Path, backend: Backend) -> None:
    body = "[limits]\nheader_timeout = 1\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        tls = tls_socket(proxy)
        with tls:
            tls.sendall(b"GET /echo HTTP/1.1\r\nHost: loc")
            with trio.fail_after(5):
                reply = await trio.to_thread.run_sync(tls.recv, 100)
        assert reply == b""  # closed without an answer
    finally:
        await proxy.terminate()


async def test_plain_http_on_tls_port_gets_a_readable_400(proxy: ProxyProcess) -> None:
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = s.recv(1000)
    assert reply.startswith(b"HTTP/1.0 400 Bad Request")
    assert b"HTTP request to an HTTPS server" in reply


async def test_connection_limit_holds_extra_clients_while_all_are_busy(
    tmp_path: Path, backend: Backend
) -> None:
    """Busy connections are never closed to make room (idle ones are: tests/test_abuse.py):
    a client beyond the limit waits in the backlog until one is idle."""
    body = "[limits]\nmax_connections = 2\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body, http=False)
    try:
        first, second = tls_socket(proxy), tls_socket(proxy)
        for busy in (first, second):
            busy.sendall(b"GET /sleep/1.5 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await trio.sleep(0.3)  # the proxy has read both requests
        context = client_context(proxy)
        third = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=1)
        outgoing = ssl.MemoryBIO()
        tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        third.sendall(outgoing.read())  # the ClientHello
        # Blocking reads in a thread: the backend answering the busy ones runs in this loop.
        with pytest.raises(TimeoutError):  # not accepted: nobody answers the ClientHello
            await trio.to_thread.run_sync(third.recv, 1)
        third.settimeout(10)
        reply = await trio.to_thread.run_sync(third.recv, 65536)
        assert reply, "accepted once a connection is idle after its response"
        for s in (first, second, third):
            s.close()
    finally:
        await proxy.terminate()


async def test_client_vanishing_mid_upload_does_not_hurt_the_proxy(proxy: ProxyProcess) -> None:
    tls = tls_socket(proxy)
    with tls:
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
        tls.sendall(b"x" * 70000)
    await trio.sleep(0.5)
    assert proxy.process.poll() is None, proxy.log()
    reply = await h1(proxy, "/echo")
    assert reply.head[0] == "HTTP/1.1 200 OK"


async def _exchange_until_closed(proxy: ProxyProcess, request: bytes) -> bytes:
    """Send raw bytes over TLS and read until the proxy closes, in a thread: the backend
    runs in this test's event loop."""
    tls = tls_socket(proxy)

    def exchange() -> bytes:
        with tls:
            tls.sendall(request)
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
            return received

    return await trio.to_thread.run_sync(exchange)


async def test_pipelined_requests_are_answered_in_order(proxy: ProxyProcess) -> None:
    received = await _exchange_until_closed(
        proxy,
        b"GET /echo?n=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /chunked/5 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /echo?n=3 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    first, second, third = (received.index(marker) for marker in (b"?n=1", b"5\r\n", b"?n=3"))
    assert first < second < third
    assert received.endswith(b"}")  # the close came after the last body, not before


async def test_http10_client_gets_a_close_delimited_body_for_a_chunked_upstream(
    proxy: ProxyProcess,
) -> None:
    received = await _exchange_until_closed(
        proxy, b"GET /chunked/70000 HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok"
    assert b"connection: close" in lines and b"transfer-encoding: chunked" not in lines
    assert len(body) == 70000
