"""HTTP/3 through the real proxy process: aioquic's client over UDP on loopback, in front
of the real HTTP/1.1 backend; and the Alt-Svc advertisement on HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, ErrorCode
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicTransportParameters, push_quic_transport_parameters
from aioquic.tls import CipherSuite, Epoch, ExtensionType, SessionTicket

from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.h3client import Response, h3_client
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.test_observability import admin_get, parse_metrics, sample

pytestmark = pytest.mark.slow


@pytest.fixture
async def proxy3(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    """The proxy with HTTP/3 on, in front of `backend` for localhost."""
    running = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), http3=True)
    yield running
    await running.terminate()


async def test_get_over_http3(proxy3: ProxyProcess, backend: Backend) -> None:
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        response = await client.request(b"GET", b"/bytes/100000", authority)
    assert response.status == 200
    assert len(response.body) == 100000
    assert backend.requests[-1]["headers"]["via"] == "3 port443"  # type: ignore[index]


BIG = 50 * 1000 * 1000
PEAK_GROWTH_LIMIT_KIB = 12 * 1024  # measured: ~1 MiB held back, ~21 MiB without windows


def peak_rss_kib(proxy: ProxyProcess) -> int:
    """The process's peak resident set so far (VmHWM): growth between two samples bounds
    everything held in between, however briefly."""
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


async def test_50mb_both_ways_under_an_rss_bound(proxy3: ProxyProcess) -> None:
    """50 MB up (hashed by the backend) and 50 MB down: streamed, not buffered whole."""
    body = os.urandom(BIG)
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        await client.request(b"GET", b"/", authority)  # warmed up: the first request's costs
        baseline = peak_rss_kib(proxy3)
        with trio.fail_after(120):
            upload = await client.request(b"POST", b"/upload", authority, body=body)
            download = await client.request(b"GET", f"/bytes/{BIG}".encode(), authority)
    assert upload.status == 200
    assert json.loads(upload.body) == {"length": BIG, "sha256": hashlib.sha256(body).hexdigest()}
    assert download.status == 200
    assert len(download.body) == BIG
    assert peak_rss_kib(proxy3) - baseline < PEAK_GROWTH_LIMIT_KIB


async def test_upload_to_a_slow_upstream_is_held_back(proxy3: ProxyProcess) -> None:
    """The client can send much faster than the upstream reads (64 KiB per 10 ms): the
    receive windows follow what the upstream took, so the proxy holds little of the body."""
    body = os.urandom(BIG)
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        await client.request(b"GET", b"/", authority)
        baseline = peak_rss_kib(proxy3)
        with trio.fail_after(120):
            upload = await client.request(b"POST", b"/upload/slow", authority, body=body)
    assert upload.status == 200
    assert json.loads(upload.body) == {"length": BIG, "sha256": hashlib.sha256(body).hexdigest()}
    assert peak_rss_kib(proxy3) - baseline < PEAK_GROWTH_LIMIT_KIB


async def test_trailers_relayed_both_ways(proxy3: ProxyProcess) -> None:
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        response = await client.request(
            b"POST",
            b"/trailers",
            authority,
            body=b"abc",
            headers=[(b"te", b"trailers")],
            trailers=[(b"x-sum", b"42")],
        )
    assert response.status == 200
    assert json.loads(response.body)["length"] == 3
    assert response.trailers is not None
    assert (b"x-trailer", b"done") in response.trailers
    assert (b"x-echo-x-sum", b"42") in response.trailers


async def test_certificate_per_sni(tmp_path: Path, backend: Backend) -> None:
    """The client verifies the certificate against the name it sent: each site's is served;
    a name no site has is refused."""
    sites = sites_toml((["a.test"], [backend.url]), (["b.test"], [backend.url]))
    proxy = await start_proxy(tmp_path, sites, http3=True)
    try:
        for name in ("a.test", "b.test"):
            authority = f"{name}:{proxy.https_port}".encode()
            async with h3_client(proxy.https_port, name, proxy.root_ca) as client:
                response = await client.request(b"GET", b"/", authority)
            assert response.status == 200
        async with h3_client(proxy.https_port, "c.test", proxy.root_ca, handshake=False) as c:
            await trio.sleep(1)
            assert not c.handshake.is_set()
        assert "QUIC: no certificate for SNI c.test" in proxy.log()
    finally:
        await proxy.terminate()


async def test_alt_svc_on_http1_and_http2(proxy3: ProxyProcess) -> None:
    expected = f'alt-svc: h3=":{proxy3.https_port}"; ma=86400'
    for version in ("--http1.1", "--http2"):
        reply = await curl(version, *proxy3.curl_args("/"))
        assert reply.header("alt-svc") == expected.partition(": ")[2], reply


async def test_no_alt_svc_when_http3_is_off(proxy: ProxyProcess) -> None:
    reply = await curl(*proxy.curl_args("/"))
    assert reply.status == 200 and reply.header("alt-svc") is None


async def test_garbage_datagrams_leave_a_client_unharmed(proxy3: ProxyProcess) -> None:
    """A burst of junk (random bytes, fake full-size Initials) while a client downloads."""
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            junk.connect(("127.0.0.1", proxy3.https_port))
            for i in range(2000):
                size = 1200 + i % 200 if i % 2 else 1 + i % 100
                first = bytes([0xC0]) + b"\x00\x00\x00\x01" if i % 4 == 1 else b""
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    junk.send(first + os.urandom(size))
        with trio.fail_after(30):
            response = await client.request(b"GET", b"/bytes/1000000", authority)
    assert response.status == 200
    assert len(response.body) == 1000000
    assert "Traceback" not in proxy3.log()


async def test_retry_under_load_still_connects(tmp_path: Path, backend: Backend) -> None:
    """With `retry_threshold = 1`, a client arriving while another handshake is in progress
    first gets a Retry; aioquic's client follows it and connects. A forged token is dropped:
    no handshake, counted by reason."""
    sites = sites_toml((["localhost"], [backend.url])) + "[http3]\nretry_threshold = 1\n"
    proxy = await start_proxy(tmp_path, sites, http3=True, admin=True)
    try:
        authority = f"localhost:{proxy.https_port}".encode()

        async def get() -> None:
            async with h3_client(proxy.https_port, "localhost", proxy.root_ca) as client:
                response = await client.request(b"GET", b"/", authority)
            assert response.status == 200

        async def retries() -> float:
            status, text = await admin_get(proxy, "/metrics")
            assert status == 200
            return sample(parse_metrics(text), "port443_quic_retries_total")

        await get()  # no handshake in progress: no Retry
        assert await retries() == 0
        stalled = QuicConnection(
            configuration=QuicConfiguration(
                is_client=True, alpn_protocols=H3_ALPN, server_name="localhost"
            )
        )
        stalled.connect(("127.0.0.1", proxy.https_port), now=0.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for data, _ in stalled.datagrams_to_send(now=0.0):  # a first flight, no more
                sock.sendto(data, ("127.0.0.1", proxy.https_port))
            await trio.sleep(0.2)
            await get()  # one handshake in progress: this client is asked to Retry first
            assert await retries() == 1
        forged = os.urandom(64)
        async with h3_client(
            proxy.https_port, "localhost", proxy.root_ca, handshake=False, token=forged
        ) as client:
            await trio.sleep(1)
            assert not client.handshake.is_set()
        _, text = await admin_get(proxy, "/metrics")
        failures = "port443_quic_handshake_failures_total"
        assert sample(parse_metrics(text), failures, reason="invalid_token") >= 1
    finally:
        await proxy.terminate()


def _ticket_allowing_early_data(server_name: str) -> SessionTicket:
    """A session ticket as a client would keep from another server (or a stolen one):
    unknown to the proxy, but it makes aioquic's client send its request as 0-RTT."""
    now = datetime.datetime.now(datetime.UTC)
    buf = Buffer(capacity=512)
    push_quic_transport_parameters(
        buf,
        QuicTransportParameters(
            initial_max_data=1 << 20,
            initial_max_stream_data_bidi_remote=1 << 20,
            initial_max_stream_data_uni=1 << 20,
            initial_max_streams_bidi=100,
            initial_max_streams_uni=100,
        ),
    )
    return SessionTicket(
        age_add=0,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(hours=1),
        not_valid_before=now - datetime.timedelta(minutes=1),
        resumption_secret=os.urandom(32),
        server_name=server_name,
        ticket=os.urandom(64),
        max_early_data_size=0xFFFFFFFF,  # what aioquic's servers grant: 0-RTT allowed
        other_extensions=[(ExtensionType.QUIC_TRANSPORT_PARAMETERS, buf.data)],
    )


async def test_0rtt_is_refused(proxy3: ProxyProcess) -> None:
    """The proxy issues no session tickets, and a client offering one (with early data)
    gets a full handshake: its 0-RTT request is not accepted early (no replay), yet it is
    answered once the handshake completes."""
    authority = f"localhost:{proxy3.https_port}".encode()
    tickets: list[SessionTicket] = []
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca, tickets=tickets) as c:
        assert (await c.request(b"GET", b"/", authority)).status == 200
    assert tickets == []
    ticket = _ticket_allowing_early_data("localhost")
    async with h3_client(
        proxy3.https_port, "localhost", proxy3.root_ca, handshake=False, session_ticket=ticket
    ) as client:
        assert client.quic._cryptos[Epoch.ZERO_RTT].send.is_valid()  # it does try 0-RTT
        with trio.fail_after(10):
            response = await client.request(b"GET", b"/echo", authority)
        assert client.handshake.is_set()
        assert not client.quic.tls.session_resumed
        assert not client.quic.tls.early_data_accepted
    assert response.status == 200


async def test_drain_lets_the_request_in_flight_finish(
    proxy3: ProxyProcess, backend: Backend
) -> None:
    """SIGTERM: GOAWAY; the request in flight is answered, a new one on the same connection
    is refused (H3_REQUEST_REJECTED, safe to retry elsewhere), then the process exits."""
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        responses: list[Response] = []

        async def slow() -> None:
            responses.append(await client.request(b"GET", b"/sleep/1.5", authority))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            with trio.fail_after(10):
                while not backend.requests:
                    await trio.sleep(0.02)
            proxy3.process.send_signal(signal.SIGTERM)
            await proxy3.wait_log("shutting down")
            with trio.fail_after(10):
                late = await client.request(b"GET", b"/echo", authority)
        assert late.reset == ErrorCode.H3_REQUEST_REJECTED
        assert responses[0].status == 200
    assert await proxy3.wait(15) == 0
    assert [r["target"] for r in backend.requests] == ["/sleep/1.5"]
