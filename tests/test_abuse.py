"""Abusive clients against a real proxy process: idle floods at the connection limit, clients
over their per-address limits, and file descriptors running out."""

from __future__ import annotations

import resource
import signal
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from h2.settings import SettingCodes

from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.h2client import h2_client
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.test_observability import admin_get, parse_metrics, sample

pytestmark = pytest.mark.slow


@contextmanager
def idle_connections(proxy: ProxyProcess, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to the HTTPS port that never send a byte."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the proxy closed `sock` (end of file or reset), False if it is still open."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def status_of(proxy: ProxyProcess, *extra: str, path: str = "/echo") -> list[str]:
    """The HTTP status of each request (several URLs ride one connection)."""
    reply = await curl(
        "-o", "/dev/null", "-w", "%{http_code}\n", *extra, *proxy.curl_args(path), check=False
    )
    return reply.body.decode().split()


async def metrics(proxy: ProxyProcess) -> str:
    status, text = await admin_get(proxy, "/metrics")
    assert status == 200
    return text


async def test_at_the_limit_the_oldest_idle_connections_make_room(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_proxy(
        tmp_path,
        "[limits]\nmax_connections = 50\n" + sites_toml((["localhost"], [backend.url])),
        admin=True,
    )
    try:
        busy: list[list[str]] = []

        async def slow_request() -> None:  # in flight all along: never closed to make room
            busy.append(await status_of(proxy, "--http1.1", path="/sleep/2"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await trio.sleep(0.5)
            with idle_connections(proxy, 60) as idle:
                await trio.sleep(0.3)  # accepted up to the limit, the rest in the backlog
                assert await status_of(proxy, "--http1.1") == ["200"]
                assert await status_of(proxy, "--http2") == ["200"]
                assert closed_by_peer(idle[0]), "the oldest idle connection made room"
                assert not closed_by_peer(idle[-1]), "the newest idle one stays"
        assert busy == [["200"]]
        samples = parse_metrics(await metrics(proxy))
        assert sample(samples, "port443_connections_evicted_total") >= 10
        assert "connection limit (50) reached: closing" in proxy.log()
    finally:
        await proxy.terminate()


def keepalive_connection(proxy: ProxyProcess) -> ssl.SSLSocket:
    """A TLS connection that made one HTTP/1.1 request and now idles between requests."""
    context = ssl.create_default_context(cafile=str(proxy.root_ca))
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
    return tls


async def test_idle_keepalive_connections_make_room_too(tmp_path: Path, backend: Backend) -> None:
    """An HTTP/1.1 connection between requests is idle: the oldest one is closed cleanly."""
    proxy = await start_proxy(
        tmp_path, "[limits]\nmax_connections = 2\n" + sites_toml((["localhost"], [backend.url]))
    )
    try:
        # In a thread: the backend answering the request runs in this event loop.
        oldest = await trio.to_thread.run_sync(keepalive_connection, proxy)
        newer = await trio.to_thread.run_sync(keepalive_connection, proxy)
        with oldest, newer:
            assert await status_of(proxy, "--http1.1") == ["200"]
            oldest.settimeout(5)
            assert oldest.recv(1) == b"", "closed with close_notify, not reset"
            newer.setblocking(False)
            with pytest.raises(ssl.SSLWantReadError):
                newer.recv(1)
        assert "connection limit (2) reached: closing 1 idle connections" in proxy.log()
    finally:
        await proxy.terminate()


async def test_connections_per_client_are_limited(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_proxy(
        tmp_path,
        "[limits]\nmax_connections_per_ip = 3\n" + sites_toml((["localhost"], [backend.url])),
        admin=True,
    )
    try:
        with idle_connections(proxy, 3) as idle:
            with idle_connections(proxy, 1) as (fourth,):
                await trio.sleep(0.3)
                assert closed_by_peer(fourth)
                assert not any(closed_by_peer(sock) for sock in idle)
            idle.pop().close()
            await trio.sleep(0.3)
            assert await status_of(proxy, "--http1.1") == ["200"]
        samples = parse_metrics(await metrics(proxy))
        assert sample(samples, "port443_client_limit_refusals_total", kind="connection") >= 1
        assert "client 127.0.0.1: more than 3 connections: refused" in proxy.log()
    finally:
        await proxy.terminate()


async def test_request_rate_per_client_gets_429_with_retry_after(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_proxy(
        tmp_path,
        "[limits]\nrequests_per_second_per_ip = 0.5\nrequest_burst_per_ip = 2\n"
        + sites_toml((["localhost"], [backend.url])),
        admin=True,
    )
    try:
        url = proxy.url("/echo")
        for protocol in ("--http1.1", "--http2"):
            # Three requests on one connection: the burst allows two.
            statuses = await status_of(proxy, protocol, url, url)
            assert statuses[-1] == "429", (protocol, statuses)
        reply = await curl("--http2", *proxy.curl_args("/echo"), check=False)
        assert reply.status == 429 and reply.header("retry-after") == "2", reply
        samples = parse_metrics(await metrics(proxy))
        assert sample(samples, "port443_client_limit_refusals_total", kind="request") >= 3
        assert "more than 0.5 requests per second: 429" in proxy.log()
    finally:
        await proxy.terminate()


async def test_behind_trusted_proxies_the_rate_counts_the_forwarded_client(
    tmp_path: Path, backend: Backend
) -> None:
    """Every request comes from the load balancer (loopback, trusted): each client it
    forwards for has its own bucket, and the log names that client."""
    proxy = await start_proxy(
        tmp_path,
        "[limits]\nrequests_per_second_per_ip = 0.5\nrequest_burst_per_ip = 2\n"
        + sites_toml((["localhost"], [backend.url])),
    )
    try:
        config = tmp_path / "port443.toml"  # a top-level key goes before the base's tables
        config.write_text('trusted_proxies = ["127.0.0.0/8"]\n' + config.read_text())
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_log("trusted_proxies changed")
        # Three requests on one connection, every body to /dev/null: the burst allows two.
        more = ("-o", "/dev/null", proxy.url("/echo"))
        first = await status_of(proxy, "-H", "X-Forwarded-For: 198.51.100.1", *more, *more)
        second = await status_of(proxy, "-H", "X-Forwarded-For: 198.51.100.2", *more, *more)
        assert first == second == ["200", "200", "429"], (first, second)
        assert "client 198.51.100.1: more than 0.5 requests per second: 429" in proxy.log()
    finally:
        await proxy.terminate()


async def test_file_descriptor_reserve_keeps_requests_and_admin_working(
    tmp_path: Path, backend: Backend
) -> None:
    """With RLIMIT_NOFILE lowered under a flood of idle clients, accepting stops before the
    last descriptors: a request still reaches its upstream (200, not 502), /healthz answers."""
    proxy = await start_proxy(
        tmp_path, sites_toml((["localhost"], [backend.url])), admin=True, http=False
    )
    try:
        resource.prlimit(proxy.process.pid, resource.RLIMIT_NOFILE, (160, 160))
        with idle_connections(proxy, 200):
            await trio.sleep(0.5)
            assert await admin_get(proxy, "/healthz") == (200, "ok")
            assert await status_of(proxy, "--http1.1") == ["200"]
            assert await status_of(proxy, "--http2") == ["200"]
        samples = parse_metrics(await metrics(proxy))
        assert sample(samples, "port443_accept_pauses_total") >= 1
        assert "fewer than 64 file descriptors left" in proxy.log()
        assert "accept failed" not in proxy.log()
    finally:
        await proxy.terminate()


async def test_http2_client_that_never_opens_its_window(tmp_path: Path, backend: Backend) -> None:
    """A stalled response is reset after [http2] stall_timeout, not client_timeout; once every
    stream of the connection is stalled, the connection is closed with all their upstreams."""
    proxy = await start_proxy(
        tmp_path,
        "[http2]\nstall_timeout = 1\n[limits]\nclient_timeout = 60\n"
        + sites_toml((["localhost"], [backend.url])),
    )
    try:
        async with h2_client(proxy, {SettingCodes.INITIAL_WINDOW_SIZE: 0}) as client:
            waiting = client.request("/stall")  # no response yet: not stalled by the client
            stalled = client.request("/bytes/1000000")
            await client.flush()
            await client.until(lambda: client.responses[stalled].done, timeout=10)
            assert client.responses[stalled].reset is not None
            assert not client.responses[waiting].done and not client.eof
        async with h2_client(proxy, {SettingCodes.INITIAL_WINDOW_SIZE: 0}) as client:
            many = [client.request("/bytes/1000000") for _ in range(20)]
            await client.flush()
            await client.until_closed(timeout=10)
            assert {client.responses[i].status for i in many} == {200}  # heads, no bodies
        assert "HTTP/2 client read nothing for 1s (20 streams stalled): closing" in proxy.log()
        with trio.fail_after(10):  # every exchange ended (access log), its upstream with it
            while proxy.log().count('"path":"/bytes/1000000"') < 21:
                await trio.sleep(0.05)
        assert await status_of(proxy, "--http2") == ["200"]
    finally:
        await proxy.terminate()
