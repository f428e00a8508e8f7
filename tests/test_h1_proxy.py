"""HTTP/1.1 through the real proxy process, with curl as the client and a real backend."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
import trio

from tests.backend import Backend
from tests.proxyproc import ProxyProcess, curl_args, run, sites_toml, start_proxy


def _split_response(out: bytes) -> tuple[list[str], bytes]:
    """curl -i output: the last header block and the body."""
    head, _, body = out.partition(b"\r\n\r\n")
    while body.startswith(b"HTTP/"):
        head, _, body = body.partition(b"\r\n\r\n")
    return head.decode().split("\r\n"), body


async def curl(proxy: ProxyProcess, path: str, *extra: str) -> tuple[list[str], bytes]:
    result = await run(*curl_args(proxy, path, "localhost", "--http1.1", "-i", *extra), check=True)
    return _split_response(result.stdout)


def header(lines: list[str], name: str) -> str | None:
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name:
            return value.strip()
    return None


async def test_get_through_proxy_carries_forwarded_headers_and_hsts(proxy: ProxyProcess) -> None:
    lines, body = await curl(proxy, "/echo?q=1", "-H", "X-Forwarded-For: 203.0.113.9")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert header(lines, "strict-transport-security") == "max-age=63072000; includeSubDomains"
    assert header(lines, "via") == "1.1 port443"
    seen = json.loads(body)
    assert seen["target"] == "/echo?q=1"
    h = seen["headers"]
    assert h["host"] == f"localhost:{proxy.https_port}"
    assert h["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "https"
    assert h["x-forwarded-host"] == f"localhost:{proxy.https_port}"
    assert h["via"] == "1.1 port443"


async def test_hop_by_hop_headers_are_not_forwarded(proxy: ProxyProcess) -> None:
    _, body = await curl(
        proxy, "/echo", "-H", "Connection: keep-alive, X-Secret", "-H", "X-Secret: 1",
        "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Authorization: Basic eA==",
        "-H", "TE: gzip, trailers", "-H", "X-Kept: yes",
    )  # fmt: skip
    h = json.loads(body)["headers"]
    for name in ("connection", "x-secret", "keep-alive", "proxy-authorization"):
        assert name not in h, name
    assert h["te"] == "trailers"  # only the token saying trailers are welcome goes on
    assert h["x-kept"] == "yes"


async def test_upstream_hsts_is_kept(proxy: ProxyProcess) -> None:
    lines, _ = await curl(proxy, "/hsts")
    values = [line for line in lines if line.lower().startswith("strict-transport-security")]
    assert values == ["strict-transport-security: max-age=5"]


async def test_keep_alive_reuses_client_and_upstream_connections(
    proxy: ProxyProcess, backend: Backend
) -> None:
    urls = [proxy.url(f"/echo?n={i}") for i in range(5)]
    args = curl_args(proxy, "/echo?n=first", "localhost", "--http1.1", "-v")
    result = await run(*args, *urls, check=True)  # six requests, one connection
    assert result.stderr.count(b"Re-using existing connection") == 5
    assert backend.connections == 1


async def test_head_204_and_304_have_no_body(proxy: ProxyProcess) -> None:
    lines, body = await curl(proxy, "/bytes/1000", "-I")
    assert (
        lines[0] == "HTTP/1.1 200 OK" and header(lines, "content-length") == "1000" and body == b""
    )
    for status in ("204", "304"):
        lines, body = await curl(proxy, f"/status/{status}")
        assert lines[0].startswith(f"HTTP/1.1 {status}") and body == b""


async def test_chunked_response_and_upload(proxy: ProxyProcess, tmp_path: Path) -> None:
    _, body = await curl(proxy, "/chunked/200000")
    assert body == b"x" * 200000
    payload = tmp_path / "payload"
    payload.write_bytes(b"abc" * 100000)
    _, body = await curl(
        proxy, "/upload", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}"
    )
    assert json.loads(body)["length"] == 300000


async def test_expect_100_continue_upload(proxy: ProxyProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"z" * 2_000_000)
    result = await run(
        *curl_args(proxy, "/upload", "localhost", "--http1.1", "-v", "-H", "Expect: 100-continue",
                   "--expect100-timeout", "20", "--data-binary", f"@{payload}"),
        check=True,
    )  # fmt: skip
    assert b"HTTP/1.1 100 Continue" in result.stderr
    assert json.loads(result.stdout)["length"] == 2_000_000


async def test_early_hints_are_relayed(proxy: ProxyProcess) -> None:
    result = await run(*curl_args(proxy, "/hints", "localhost", "--http1.1", "-i"), check=True)
    assert result.stdout.startswith(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload")
    assert b"HTTP/1.1 200 OK" in result.stdout


async def test_early_response_to_upload_is_delivered(proxy: ProxyProcess, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"q" * 20_000_000)
    lines, _ = await curl(proxy, "/early/413", "--data-binary", f"@{payload}")
    assert lines[0] == "HTTP/1.1 413 Request Entity Too Large"


async def test_unknown_host_is_misdirected(proxy: ProxyProcess) -> None:
    lines, _ = await curl(proxy, "/echo", "-H", "Host: other.test")
    assert lines[0] == "HTTP/1.1 421 Misdirected Request"


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
            lines, text = await curl(proxy, "/echo")
            assert lines[0] == "HTTP/1.1 502 Bad Gateway"
            assert text == b"upstream unavailable\n"
            assert f"site localhost: upstream unavailable: http://127.0.0.1:{dead}" in proxy.log()
            result = await run(
                *curl_args(proxy, "/echo", "alive.test", "--http1.1", "-k"), check=True
            )
            assert json.loads(result.stdout)["target"] == "/echo"
        finally:
            await proxy.terminate()


async def test_upstream_stall_gives_504(tmp_path: Path, backend: Backend) -> None:
    body = "[limits]\nupstream_timeout = 1\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        lines, _text = await curl(proxy, "/stall")
        assert lines[0] == "HTTP/1.1 504 Gateway Timeout"
        assert "upstream timed out" in proxy.log()
        lines, _ = await curl(proxy, "/echo")
        assert lines[0] == "HTTP/1.1 200 OK"
    finally:
        await proxy.terminate()


async def test_oversized_header_gives_431(proxy: ProxyProcess) -> None:
    lines, _ = await curl(proxy, "/echo", "-H", "X-Big: " + "a" * 100 * 1024)
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert header(lines, "connection") == "close"


async def _tls_socket(proxy: ProxyProcess) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(proxy.root_ca))
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


async def test_malformed_request_gives_400(proxy: ProxyProcess) -> None:
    tls = await _tls_socket(proxy)
    with tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n")
        reply = tls.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_slow_header_client_is_cut_off(tmp_path: Path, backend: Backend) -> None:
    body = "[limits]\nheader_timeout = 1\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    try:
        tls = await _tls_socket(proxy)
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
        first, second = await _tls_socket(proxy), await _tls_socket(proxy)
        for busy in (first, second):
            busy.sendall(b"GET /sleep/1.5 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await trio.sleep(0.3)  # the proxy has read both requests
        context = ssl.create_default_context(cafile=str(proxy.root_ca))
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
    tls = await _tls_socket(proxy)
    with tls:
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
        tls.sendall(b"x" * 70000)
    await trio.sleep(0.5)
    assert proxy.process.poll() is None, proxy.log()
    lines, _ = await curl(proxy, "/echo")
    assert lines[0] == "HTTP/1.1 200 OK"


async def _exchange_until_closed(proxy: ProxyProcess, request: bytes) -> bytes:
    """Send raw bytes over TLS and read until the proxy closes, in a thread: the backend
    runs in this test's event loop."""
    tls = await _tls_socket(proxy)

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
