"""The HTTP/2 session engine in process: our upstream client role against our server role
over a socket pair (flow control both ways, resets, GOAWAY drain), the coalescing writer,
and the two private APIs of h2 the engine relies on."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from hyperframe.frame import GoAwayFrame

from proxy.config import Http2Config, LimitsConfig, Upstream
from proxy.connections import ConnectionRegistry
from proxy.h2session import CoalescingWriter, keep_streams_after_goaway, pending_output
from proxy.http.h2 import H2ServerSession, H2ServerStream
from proxy.http.model import ConnectionInfo, ResponseHead, UpstreamRequest
from proxy.netio import NO_DEADLINE, SocketStream
from proxy.upstream.connect import Connector, Transport
from proxy.upstream.h2 import H2Pool, H2UpstreamStream
from proxy.upstream.stream import BodyEnd, UpstreamClosed, UpstreamRefused

TIMEOUT = 10.0
Handler = Callable[[H2ServerStream], Awaitable[None]]


async def _echo_digest(exchange: H2ServerStream) -> None:
    """Reads the whole body, answers its SHA-256 and then the body itself."""
    body = bytearray()
    while data := await exchange.receive_data():
        body += data
    digest = hashlib.sha256(body).hexdigest().encode()
    await exchange.send_head(ResponseHead(200, [(b"x-digest", digest)]), b"", end=False)
    await exchange.send_data(bytes(body))
    await exchange.send_end()


class Pair:
    """A server session and, over a socket pair, the upstream pool holding its peer."""

    def __init__(self, server: H2ServerSession, pool: H2Pool, first: H2UpstreamStream) -> None:
        self.server = server
        self.pool = pool
        self.first = first


async def _pair(nursery: trio.Nursery, handler: Handler, http2: Http2Config | None = None) -> Pair:
    ours, theirs = socket.socketpair()
    info = ConnectionInfo("127.0.0.1", None, "h2")
    limits = LimitsConfig(client_timeout=TIMEOUT, upstream_timeout=TIMEOUT)
    server = H2ServerSession(
        SocketStream(ours),
        info,
        handler,
        limits,
        http2 or Http2Config(),
        ConnectionRegistry(1).admit(),
    )
    nursery.start_soon(server.serve)
    upstream = Upstream(url="h2c://localhost:1", scheme="h2c", host="localhost", port=1)
    pool = H2Pool(upstream, limits, Connector(upstream, TIMEOUT), nursery.start_soon)
    first = await pool.adopt(Transport(SocketStream(theirs), theirs, "h2"))
    return Pair(server, pool, first)


def _request(method: bytes, target: bytes, *, has_body: bool = False) -> UpstreamRequest:
    return UpstreamRequest(
        method=method, target=target, authority=b"localhost", fields=[], has_body=has_body
    )


async def _exchange(stream: H2UpstreamStream, body: bytes) -> tuple[int, bytes, bytes]:
    """POST `body` in 64 KiB pieces; the status, x-digest and the response body."""
    await stream.send_head(_request(b"POST", b"/", has_body=bool(body)), TIMEOUT)
    for start in range(0, len(body), 65536):
        await stream.send_data(body[start : start + 65536], TIMEOUT)
    if body:
        await stream.send_end(None, TIMEOUT)
    head = await stream.next_event(TIMEOUT)
    assert isinstance(head, ResponseHead)
    received = bytearray()
    while not isinstance(event := await stream.next_event(TIMEOUT), BodyEnd):
        assert isinstance(event, bytes)
        received += event
    stream.release()
    return head.status, dict(head.headers)[b"x-digest"], bytes(received)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            yield nursery
            nursery.cancel_scope.cancel()


async def test_bodies_beyond_every_window_pass_both_ways_on_concurrent_streams(
    nursery: trio.Nursery,
) -> None:
    """Small server windows make the client role wait for WINDOW_UPDATE; 1 MiB answers
    exceed the client role's 256 KiB stream window and the writers' high water mark."""
    pair = await _pair(
        nursery, _echo_digest, Http2Config(initial_window_size=16384, connection_window_size=65535)
    )
    bodies = [bytes([n]) * (1024 * 1024 + n * 1000) for n in range(6)]
    results: dict[int, tuple[int, bytes, bytes]] = {}

    async def one(n: int, stream: H2UpstreamStream) -> None:
        results[n] = await _exchange(stream, bodies[n])

    async with trio.open_nursery() as requests:
        requests.start_soon(one, 0, pair.first)
        for n in range(1, len(bodies)):
            requests.start_soon(one, n, await pair.pool.open_stream())
    for n, body in enumerate(bodies):
        status, digest, echoed = results[n]
        assert (status, digest) == (200, hashlib.sha256(body).hexdigest().encode())
        assert echoed == body
    assert pair.first.session.backlog() == 0


async def test_a_stream_the_handler_aborts_fails_only_that_request(nursery: trio.Nursery) -> None:
    async def handler(exchange: H2ServerStream) -> None:
        if exchange.request.target == b"/abort":
            await exchange.abort()
        else:
            await _echo_digest(exchange)

    pair = await _pair(nursery, handler)
    await pair.first.send_head(_request(b"GET", b"/abort"), TIMEOUT)
    with pytest.raises(UpstreamClosed, match=r"reset the stream \(INTERNAL_ERROR\)"):
        await pair.first.next_event(TIMEOUT)
    await pair.first.aclose()
    status, _, echoed = await _exchange(await pair.pool.open_stream(), b"still here")
    assert (status, echoed) == (200, b"still here")


async def test_goaway_drains_the_stream_in_flight_and_refuses_new_ones(
    nursery: trio.Nursery,
) -> None:
    started = trio.Event()
    proceed = trio.Event()

    async def handler(exchange: H2ServerStream) -> None:
        started.set()
        await proceed.wait()
        await _echo_digest(exchange)

    pair = await _pair(nursery, handler)
    served = trio.Event()

    async def in_flight() -> None:
        assert await _exchange(pair.first, b"") == (200, hashlib.sha256().hexdigest().encode(), b"")
        served.set()

    nursery.start_soon(in_flight)
    await started.wait()
    session = pair.first.session
    pair.server.close_if_idle()  # what draining on shutdown does
    while session.has_room():  # until our GOAWAY has reached the client role
        await trio.sleep(0.01)
    late = session.new_stream()
    with pytest.raises(UpstreamRefused):
        await late.send_head(_request(b"GET", b"/"), TIMEOUT)
    await late.aclose()
    proceed.set()
    await served.wait()


async def test_the_writer_coalesces_what_was_queued_between_its_runs() -> None:
    sent: list[bytes] = []

    class Recorder(SocketStream):
        async def send_all(self, data: bytes | memoryview, deadline: float = NO_DEADLINE) -> None:
            sent.append(bytes(data))

    queue = bytearray()

    def take() -> bytes:
        data = bytes(queue)
        queue.clear()
        return data

    ours, theirs = socket.socketpair()
    with ours, theirs:
        writer = CoalescingWriter(Recorder(ours), TIMEOUT, take, lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.testing.wait_all_tasks_blocked()
            for frame in (b"a", b"b", b"c"):
                queue += frame
                writer.wake()
            await trio.testing.wait_all_tasks_blocked()
            queue += b"d"
            writer.close()
    assert sent == [b"abc", b"d"]


# -- h2's private APIs: these fail first when an h2 release changes them ----------------------


def test_h2_private_output_buffer_is_still_there() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    assert isinstance(getattr(conn, "_data_to_send", None), bytearray), (
        "h2 no longer has H2Connection._data_to_send: proxy.h2session.pending_output needs "
        "another way to measure queued output"
    )
    conn.initiate_connection()
    queued = pending_output(conn)
    assert queued == len(conn.data_to_send()) > 0, "pending_output no longer measures h2's queue"
    assert pending_output(conn) == 0


def test_h2_private_transitions_still_let_streams_outlive_a_goaway() -> None:
    machine = h2.connection.H2ConnectionStateMachine
    assert isinstance(getattr(machine, "_transitions", None), dict), (
        "h2 no longer has H2ConnectionStateMachine._transitions: "
        "proxy.h2session.keep_streams_after_goaway needs another way"
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    keep_streams_after_goaway(conn)
    conn.initiate_connection()
    conn.send_headers(
        1, [(":method", "POST"), (":scheme", "http"), (":path", "/"), (":authority", "a")]
    )
    events = conn.receive_data(GoAwayFrame(0, last_stream_id=1, error_code=0).serialize())
    assert any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
    conn.send_data(1, b"body", end_stream=True)  # h2 alone raises ProtocolError here
    assert b"body" in conn.data_to_send()
