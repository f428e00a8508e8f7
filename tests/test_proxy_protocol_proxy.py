"""PROXY protocol on the real proxy's listeners: haproxy (tcp mode, send-proxy and
send-proxy-v2) in front of it, and raw sockets sending hand-built v1/v2 headers.

The balancer is 127.0.0.1 (proxy_protocol_from); clients come from 127.0.0.2, so the address
the upstream and the access log see tells the header's source from the balancer's."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.net import free_ports
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.proxy_protocol import LOCAL, v1, v2
from tests.support.run import wait_listening
from tests.support.tls import client_context

pytestmark = pytest.mark.slow

CLIENT = "127.0.0.2"  # the client behind the balancer (any loopback address works on Linux)
HEADER_TIMEOUT = 2
LISTEN = 'proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1/32"]'
HAPROXY = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen v1_https
    bind 127.0.0.1:{v1_https}
    server proxy 127.0.0.1:{https} send-proxy
listen v2_https
    bind 127.0.0.1:{v2_https}
    server proxy 127.0.0.1:{https} send-proxy-v2
listen v2_http
    bind 127.0.0.1:{v2_http}
    server proxy 127.0.0.1:{http} send-proxy-v2
"""


async def start(tmp_path: Path, backend: Backend, limits: str = "") -> ProxyProcess:
    """The proxy taking PROXY headers from 127.0.0.1."""
    limits = f"[limits]\nheader_timeout = {HEADER_TIMEOUT}\n{limits}\n"
    body = limits + sites_toml((["localhost"], [backend.url]))
    return await start_proxy(tmp_path, body, admin=True, listen=LISTEN)


@pytest.fixture
async def proxied(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    running = await start(tmp_path, backend)
    yield running
    await running.terminate()


def logged_clients(proxy: ProxyProcess, listener: str = "https") -> list[str]:
    """The access log's client of each request on `listener`."""
    lines = [json.loads(line) for line in proxy.log().splitlines() if line[:1] == "{"]
    return [line["client_ip"] for line in lines if line.get("listener", listener) == listener]


async def rejections(proxy: ProxyProcess) -> dict[str, float]:
    """port443_proxy_protocol_rejections_total by reason, from the admin port."""
    text = (await proxy.admin("/metrics")).text
    prefix = 'port443_proxy_protocol_rejections_total{reason="'
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            reason, _, value = line.removeprefix(prefix).partition('"} ')
            found[reason] = float(value)
    return found


async def test_haproxy_send_proxy_v1_and_v2(
    tmp_path: Path, proxied: ProxyProcess, backend: Backend
) -> None:
    """Through haproxy the upstream sees the client's address (X-Forwarded-For, Forwarded),
    the access log names it, and the HTTP port takes the header too."""
    v1_https, v2_https, v2_http = free_ports(3, besides=(proxied.https_port, proxied.http_port))
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY.format(
            v1_https=v1_https,
            v2_https=v2_https,
            v2_http=v2_http,
            https=proxied.https_port,
            http=proxied.http_port,
        )
    )
    haproxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert await wait_listening(haproxy, v1_https, v2_https, v2_http), "haproxy did not start"
        ca = str(proxied.root_ca)
        for port, version in ((v1_https, "--http1.1"), (v2_https, "--http2")):
            reply = await curl(
                "--interface", CLIENT, version, "--cacert", ca,
                "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/echo",
            )  # fmt: skip
            headers = json.loads(reply.body)["headers"]
            assert headers["x-forwarded-for"] == CLIENT
            assert headers["forwarded"].startswith(f"for={CLIENT};proto=https")
        redirect = await curl("--interface", CLIENT, f"http://localhost:{v2_http}/x")
        assert redirect.status == 308
    finally:
        haproxy.terminate()
        haproxy.wait(10)
    await proxied.terminate()
    assert logged_clients(proxied) == [CLIENT, CLIENT]
    assert logged_clients(proxied, "http") == [CLIENT]


def tls_exchange(proxy: ProxyProcess, header: bytes, source: str = "127.0.0.1") -> bytes:
    """`header`, then a TLS GET /echo over the same connection; the response (blocking: run
    it in a thread, the backend serves in the test's event loop)."""
    raw = socket.create_connection(
        ("127.0.0.1", proxy.https_port), timeout=10, source_address=(source, 0)
    )
    raw.sendall(header)
    with client_context(proxy, "http/1.1").wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return read_all(tls)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def forwarded_for(response: bytes) -> tuple[str, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    headers = json.loads(body)["headers"]
    return headers["x-forwarded-for"], headers["forwarded"].partition(";")[0]


async def in_thread(call: Callable[[], bytes]) -> bytes:
    return await trio.to_thread.run_sync(call)


async def test_hand_built_headers(proxied: ProxyProcess) -> None:
    """IPv4 by v1, IPv6 by v2 (with a TLV), LOCAL (the balancer itself is the client), and the
    plain-HTTP port."""
    for header, xff, node in (
        (v1("198.51.100.7", "127.0.0.1"), "198.51.100.7", "for=198.51.100.7"),
        (v2("2001:db8::7", "::1", tlvs=b"\x04\x00\x00"), "2001:db8::7", 'for="[2001:db8::7]"'),
        (v2(command=LOCAL), "127.0.0.1", "for=127.0.0.1"),
    ):
        response = await in_thread(lambda header=header: tls_exchange(proxied, header))
        assert forwarded_for(response) == (xff, node)

    def redirect() -> bytes:
        with socket.create_connection(("127.0.0.1", proxied.http_port), timeout=10) as sock:
            sock.sendall(v1("203.0.113.5", "127.0.0.1", port=80) + b"GET /a HTTP/1.1\r\n")
            sock.sendall(b"Host: localhost\r\nConnection: close\r\n\r\n")
            return read_all(sock)

    assert (await in_thread(redirect)).startswith(b"HTTP/1.1 308")
    await proxied.terminate()
    assert logged_clients(proxied) == ["198.51.100.7", "2001:db8::7", "127.0.0.1"]
    assert logged_clients(proxied, "http") == ["203.0.113.5"]
    assert "PROXY protocol header required from 127.0.0.1/32" in proxied.log()


def closed_by_proxy(sock: socket.socket) -> bool:
    """The proxy closed the connection without answering a byte."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def refused(proxy: ProxyProcess, data: bytes, source: str = "127.0.0.1") -> bool:
    with socket.create_connection(
        ("127.0.0.1", proxy.https_port), timeout=HEADER_TIMEOUT + 8, source_address=(source, 0)
    ) as sock:
        sock.sendall(data)
        return closed_by_proxy(sock)


async def test_bad_missing_stalled_and_untrusted_headers_close_the_connection(
    proxied: ProxyProcess,
) -> None:
    header = v2("198.51.100.7", "127.0.0.1")
    cases = [
        ("malformed", b"PROXY TCP4 198.51.100.7\r\n", "127.0.0.1"),
        ("missing", b"\x16\x03\x01\x00\x05hello", "127.0.0.1"),
        ("timeout", header[:20], "127.0.0.1"),  # then stalled: closed after header_timeout
        ("untrusted", v1("198.51.100.7", "127.0.0.1"), CLIENT),
    ]
    for reason, data, source in cases:
        start = trio.current_time()
        assert await trio.to_thread.run_sync(refused, proxied, data, source), reason
        assert trio.current_time() - start < HEADER_TIMEOUT + 5
        await proxied.wait_log(f"PROXY protocol {reason}: ")
    # A real client from the balancer's address without a header: refused as well.
    direct = await curl(*proxied.curl_args("/echo"), check=False)
    assert direct.status == 0
    assert await rejections(proxied) == {
        "malformed": 1,
        "missing": 2,
        "timeout": 1,
        "untrusted": 1,
    }
    # A client not in proxy_protocol_from without a header is its own client.
    reply: Reply = await curl(
        "--interface", CLIENT, "--cacert", str(proxied.root_ca),
        "--resolve", proxied.resolve(), proxied.url("/echo"),
    )  # fmt: skip
    assert json.loads(reply.body)["headers"]["x-forwarded-for"] == CLIENT


async def test_connections_per_client_count_the_header_address(
    tmp_path: Path, backend: Backend
) -> None:
    """max_connections_per_ip = 1 counts the clients the balancer names, not the balancer:
    a second client through it is served, a second connection of the first is not."""
    proxied = await start(tmp_path, backend, "max_connections_per_ip = 1")
    context = client_context(proxied, "http/1.1")

    def open_tls(source: str) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", proxied.https_port), timeout=10)
        raw.sendall(v1(source, "127.0.0.1"))
        return context.wrap_socket(raw, server_hostname="localhost")

    first = await trio.to_thread.run_sync(open_tls, "198.51.100.1")
    try:
        response = await in_thread(lambda: tls_exchange(proxied, v1("198.51.100.2", "127.0.0.1")))
        assert forwarded_for(response)[0] == "198.51.100.2"
        with pytest.raises((ssl.SSLError, OSError)):
            await trio.to_thread.run_sync(open_tls, "198.51.100.1")
        await proxied.wait_log("client 198.51.100.1: more than 1 connections: refused")
    finally:
        first.close()
        await proxied.terminate()
