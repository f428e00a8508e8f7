"""HTTP/2 (h2c) and TLS (https) upstreams through the real proxy process, with real clients."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trustme

from tests.support.backend import Backend, serve_backend
from tests.support.curl import Reply, curl
from tests.support.h2backend import H2Backend, serve_h2_backend
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy, write_config
from tests.support.tls import tls_stream

pytestmark = pytest.mark.slow


def localhost_site(upstream: str) -> str:
    return sites_toml((["localhost"], [upstream]))


@asynccontextmanager
async def proxy_for(tmp_path: Path, body: str) -> AsyncIterator[ProxyProcess]:
    proxy = await start_proxy(tmp_path, body, http=False)
    try:
        yield proxy
    finally:
        await proxy.terminate()


async def fetch(proxy: ProxyProcess, path: str, *extra: str) -> Reply:
    return await curl(*extra, *proxy.curl_args(path))


async def h1_exchange(
    proxy: ProxyProcess, *events: h11.Event
) -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    """One HTTP/1.1 exchange over TLS with h11 (curl cannot send or show trailers)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(30):
        stream = await tls_stream(proxy)
        await stream.send_all(b"".join(conn.send(event) or b"" for event in events))
        response: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                await stream.aclose()
                assert response is not None
                return response, body, list(event.headers)


def request(target: bytes, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> h11.Request:
    return h11.Request(method=method, target=target, headers=[(b"host", b"localhost"), *headers])


# -- h2c -------------------------------------------------------------------------------------


async def test_h1_and_h2_clients_reach_an_h2c_upstream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:
        for version, via in (("--http1.1", "1.1 port443"), ("--http2", "2 port443")):
            reply = await fetch(proxy, "/echo?q=1", version, "-H", "TE: trailers")
            assert reply.status == 200
            seen = json.loads(reply.body)["headers"]
            assert seen[":method"] == "GET" and seen[":path"] == "/echo?q=1"
            assert seen[":scheme"] == "http"
            assert seen[":authority"] == f"localhost:{proxy.https_port}"
            assert "host" not in seen and "transfer-encoding" not in seen
            assert seen["te"] == "trailers"  # gRPC servers insist on it
            assert seen["x-forwarded-proto"] == "https" and seen["via"] == via
        assert (await fetch(proxy, "/echo")).header("via") == "2 port443"
    assert backend.connections == 1  # both requests shared one upstream connection


async def test_bodies_larger_than_every_window_flow_both_ways(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: 32 initial upstream windows
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:
        reply = await fetch(proxy, "/bytes/5000000", "--http1.1")
        assert (reply.status, len(reply.body)) == (200, 5_000_000)
        reply = await fetch(proxy, "/echo", "--http2", "--data-binary", f"@{payload}")
        echo = json.loads(reply.body)
        assert reply.status == 200 and echo["length"] == 2 * 1024 * 1024
        assert echo["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()


async def test_trailers_pass_both_ways(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:
        response, body, trailers = await h1_exchange(
            proxy,
            request(b"/trailers", (b"transfer-encoding", b"chunked"), (b"te", b"trailers"),
                    method=b"POST"),
            h11.Data(data=b"hello"),
            h11.EndOfMessage(headers=[(b"x-sum", b"42")]),
        )  # fmt: skip
    assert response.status_code == 200 and body == b"body"
    assert trailers == [(b"x-status", b"0"), (b"x-echo-x-sum", b"42")]


async def test_streams_share_connections_within_max_concurrent_streams(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend(max_concurrent_streams=10))
    statuses: list[int] = []
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:

        async def one(n: int) -> None:
            response, _, _ = await h1_exchange(proxy, request(f"/slow/0.5?n={n}".encode()))
            statuses.append(response.status_code)

        async with trio.open_nursery() as clients:
            for n in range(50):
                clients.start_soon(one, n)
    assert statuses == [200] * 50
    assert backend.peak_streams == 10  # connections were filled up to the upstream's limit
    assert backend.connections <= math.ceil(50 / 10)


async def test_goaway_retries_unprocessed_streams_on_a_new_connection(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend(goaway_after=2))
    results: dict[str, Reply] = {}
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:

        async def get(path: str) -> None:
            results[path] = await fetch(proxy, path)

        async with trio.open_nursery() as clients:
            clients.start_soon(get, "/slow/1")  # stream 1: processed, answered after GOAWAY
            await trio.sleep(0.3)
            clients.start_soon(get, "/echo")  # stream 3: above GOAWAY's last stream id
    assert results["/slow/1"].status == results["/echo"].status == 200
    assert [seen[":path"] for seen in backend.requests] == ["/slow/1", "/echo", "/echo"]
    assert backend.connections == 2


async def test_reload_lets_streams_finish_then_closes_the_old_connection(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    results: list[Reply] = []
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:

        async def slow() -> None:
            results.append(await fetch(proxy, "/slow/1.5"))

        async with trio.open_nursery() as clients:
            clients.start_soon(slow)
            await trio.sleep(0.5)
            write_config(
                tmp_path, localhost_site(backend.url), http_port=0, https_port=proxy.https_port
            )
            proxy.process.send_signal(signal.SIGHUP)
            await proxy.wait_log("reloaded", timeout=10)
            assert (await fetch(proxy, "/echo")).status == 200  # the new generation's connection
            assert backend.closed == 0  # the old one still carries the slow request
        assert results[0].status == 200
        with trio.fail_after(5):
            while backend.closed < 1:  # ... and is closed once that has ended
                await trio.sleep(0.05)
        assert backend.connections == 2


async def test_upstream_stream_resets(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:
        assert (await fetch(proxy, "/reset")).status == 502
        assert "reset the stream (INTERNAL_ERROR)" in proxy.log()
        # REFUSED_STREAM: sent again, a few times
        assert (await fetch(proxy, "/refuse")).status == 502
        assert "refused the stream" in proxy.log()
        assert (await fetch(proxy, "/echo")).status == 200  # the connection is still good
    paths = [seen[":path"] for seen in backend.requests]
    assert paths == ["/reset", "/refuse", "/refuse", "/refuse", "/echo"]
    assert backend.connections == 1


async def test_h2c_to_an_http1_server_is_502(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend: Backend = await nursery.start(serve_backend, Backend())
    async with proxy_for(tmp_path, localhost_site(f"h2c://127.0.0.1:{backend.port}")) as proxy:
        assert (await fetch(proxy, "/echo")).status == 502
        assert "does not speak HTTP/2" in proxy.log()


# -- https -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, name: str, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    context.set_alpn_protocols(alpn)
    return context


async def test_https_upstream_speaking_h2_by_alpn(
    tmp_path: Path, nursery: trio.Nursery, upstream_ca: trustme.CA
) -> None:
    context = server_context(upstream_ca, "127.0.0.1", ["h2"])
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend(ssl_context=context))
    upstream_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with proxy_for(
        tmp_path, localhost_site(backend.url) + f'upstream_ca = "{tmp_path / "ca.pem"}"\n'
    ) as proxy:
        for version in ("--http1.1", "--http2"):
            reply = await fetch(proxy, "/echo", version)
            assert reply.status == 200
            assert json.loads(reply.body)["headers"][":scheme"] == "https"
    assert backend.connections == 1


async def test_https_upstream_speaking_http1_by_alpn_with_a_server_name(
    tmp_path: Path, nursery: trio.Nursery, upstream_ca: trustme.CA
) -> None:
    context = server_context(upstream_ca, "backend.test", ["http/1.1"])
    backend: Backend = await nursery.start(serve_backend, Backend(ssl_context=context))
    upstream_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    body = localhost_site(backend.url) + (
        f'upstream_ca = "{tmp_path / "ca.pem"}"\nupstream_server_name = "backend.test"\n'
    )
    async with proxy_for(tmp_path, body) as proxy:
        for _ in range(2):
            reply = await fetch(proxy, "/echo", "--http2")
            assert reply.status == 200 and json.loads(reply.body)["target"] == "/echo"
    assert backend.connections == 1  # kept alive, and TLS session tickets did not stale it


async def test_untrusted_upstream_certificate_is_502_with_the_reason(
    tmp_path: Path, nursery: trio.Nursery, upstream_ca: trustme.CA
) -> None:
    context = server_context(upstream_ca, "127.0.0.1", ["h2", "http/1.1"])
    backend: Backend = await nursery.start(serve_backend, Backend(ssl_context=context))
    async with proxy_for(
        tmp_path, localhost_site(backend.url)
    ) as proxy:  # system trust: not our CA
        reply = await fetch(proxy, "/echo")
        assert (reply.status, reply.body) == (502, b"upstream unavailable\n")
        assert (
            f"site localhost: upstream unavailable: {backend.url}: TLS certificate "
            "verification failed for 127.0.0.1: unable to get local issuer certificate"
        ) in proxy.log()
    assert backend.requests == []


async def test_upgrade_request_to_an_h2c_upstream_goes_as_a_plain_request(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """HTTP/2 has no Upgrade (RFC 9113 §8.2.2): the connection-specific fields are dropped
    and the upstream's ordinary answer comes back."""
    backend: H2Backend = await nursery.start(serve_h2_backend, H2Backend())
    async with proxy_for(tmp_path, localhost_site(backend.url)) as proxy:
        upgrade = ("-H", "Connection: Upgrade", "-H", "Upgrade: websocket")
        reply = await fetch(proxy, "/echo", "--http1.1", *upgrade)
        assert reply.status == 200
        seen = json.loads(reply.body)["headers"]
        assert "upgrade" not in seen and "connection" not in seen
