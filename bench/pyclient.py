"""A load generator in Python for HTTP/3 (aioquic) and HTTP/2 (h2), speaking h2load's language.

    python bench/pyclient.py --npn-list=h3 -c 10 -m 10 -D 5 --log-file=F \\
        --connect-to=127.0.0.1:8443 https://localhost:8443/

h2load (nghttp2 1.52 in Debian) is built without HTTP/3, so the HTTP/3 row needs another
client; this one drives HTTP/2 the same way (same loop, same language, same concurrency), so
the two rows differ only in the protocol. It takes the subset of h2load's options the bench
uses and prints h2load's summary lines and --log-file format, so `load.py` runs and accounts
for it as it does h2load. `-c` connections, each with `-m` requests in flight, for `-D`
seconds or `-n` requests; certificates are not verified (as h2load). Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamReset

Headers = list[tuple[bytes, bytes]]


@dataclass
class Pending:
    """One request in flight: its status once the response ended (0: reset or lost)."""

    status: int = 0
    done: trio.Event = field(default_factory=trio.Event)


class Connection(Protocol):
    async def run(self) -> None:
        """Read responses until cancelled."""

    async def request(self, headers: Headers) -> int:
        """One request; its response status, 0 if it failed."""


class H3Client:
    """HTTP/3 over aioquic's sans-IO QUIC, on a connected UDP socket."""

    def __init__(self, address: tuple[str, int], server_name: str) -> None:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name=server_name,
            verify_mode=ssl.CERT_NONE,
        )
        self._address = address
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._quic = QuicConnection(configuration=configuration)
        self._h3 = H3Connection(self._quic)
        self._pending: dict[int, Pending] = {}
        self.ready = trio.Event()
        self.closed = False

    async def run(self) -> None:
        sock = self._sock
        sock.connect(self._address)
        self._quic.connect(self._address, trio.current_time())
        self._transmit()
        while not self.closed:
            timer = self._quic.get_timer()
            with trio.move_on_at(math.inf if timer is None else timer):
                await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                self._quic.receive_datagram(data, self._address, trio.current_time())
            timer = self._quic.get_timer()
            if timer is not None and trio.current_time() >= timer:
                self._quic.handle_timer(trio.current_time())
            self._events()
            self._transmit()

    def _transmit(self) -> None:
        for data, _ in self._quic.datagrams_to_send(trio.current_time()):
            with contextlib.suppress(BlockingIOError):  # a full buffer is loss: QUIC resends
                self._sock.send(data)

    def _events(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.ready.set()
            elif isinstance(event, ConnectionTerminated):
                self.closed = True
                self.ready.set()
                for pending in self._pending.values():
                    pending.done.set()
            elif isinstance(event, StreamReset) and event.stream_id in self._pending:
                self._pending.pop(event.stream_id).done.set()
            for h3_event in self._h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived | DataReceived):
                    self._h3_event(h3_event)

    def _h3_event(self, event: HeadersReceived | DataReceived) -> None:
        pending = self._pending.get(event.stream_id)
        if pending is None:
            return
        if isinstance(event, HeadersReceived) and not pending.status:
            pending.status = int(dict(event.headers).get(b":status", b"0"))
        if event.stream_ended:
            del self._pending[event.stream_id]
            pending.done.set()

    async def request(self, headers: Headers) -> int:
        await self.ready.wait()
        if self.closed:
            return 0
        stream_id = self._quic.get_next_available_stream_id()
        pending = self._pending[stream_id] = Pending()
        self._h3.send_headers(stream_id, headers, end_stream=True)
        self._transmit()
        await pending.done.wait()
        return pending.status


class H2Client:
    """HTTP/2 over TLS (h2 on a trio SSLStream)."""

    def __init__(self, address: tuple[str, int], server_name: str) -> None:
        self._address = address
        self._server_name = server_name
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._send_lock = trio.Lock()
        self._pending: dict[int, Pending] = {}
        self.ready = trio.Event()
        self.closed = False

    async def run(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        try:
            tcp = await trio.open_tcp_stream(*self._address)
            self._stream = trio.SSLStream(tcp, context, server_hostname=self._server_name)
            self._h2.initiate_connection()
            await self._flush()
            self.ready.set()
            while data := await self._stream.receive_some(65536):
                for event in self._h2.receive_data(data):
                    self._event(event)
                await self._flush()
        except (OSError, trio.BrokenResourceError, h2.exceptions.ProtocolError):
            pass
        self.closed = True
        self.ready.set()
        for pending in self._pending.values():
            pending.done.set()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        pending = self._pending.get(getattr(event, "stream_id", 0) or 0)
        if pending is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            pending.status = int(dict(event.headers).get(b":status", b"0"))
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            del self._pending[event.stream_id]
            pending.done.set()

    async def _flush(self) -> None:
        assert self._stream is not None
        async with self._send_lock:
            if data := self._h2.data_to_send():
                await self._stream.send_all(data)

    async def request(self, headers: Headers) -> int:
        await self.ready.wait()
        if self.closed:
            return 0
        stream_id = self._h2.get_next_available_stream_id()
        pending = self._pending[stream_id] = Pending()
        self._h2.send_headers(stream_id, headers, end_stream=True)
        await self._flush()
        await pending.done.wait()
        return pending.status


@dataclass
class Tally:
    """Every request's start (µs since the run began), status and duration (µs)."""

    started: int = 0
    log: list[tuple[int, int, int]] = field(default_factory=list)


async def worker(
    client: Connection, headers: Headers, tally: Tally, budget: int, deadline: float, t0: float
) -> None:
    while tally.started < budget and time.monotonic() < deadline:
        tally.started += 1
        start = time.monotonic()
        status = await client.request(headers)
        tally.log.append((int((start - t0) * 1e6), status, int((time.monotonic() - start) * 1e6)))
        if not status:
            return  # the connection failed: its other workers end too


async def load(args: argparse.Namespace) -> tuple[Tally, float]:
    url = args.url.split("://", 1)[1]
    authority, _, path = url.partition("/")
    host = authority.rsplit(":", 1)[0]
    connect_host, _, connect_port = (args.connect_to or authority).rpartition(":")
    address = (connect_host, int(connect_port))
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", b"/" + path.encode()),
        (b"user-agent", b"pyclient"),
    ]
    kind = H3Client if args.npn_list == "h3" else H2Client
    budget = args.n if args.n else 1 << 62
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + (args.D if args.D else 600.0)
    async with trio.open_nursery() as nursery:
        clients = [kind(address, host) for _ in range(args.c)]
        for client in clients:
            nursery.start_soon(client.run)
        async with trio.open_nursery() as workers:
            for client in clients:
                for _ in range(args.m):
                    workers.start_soon(worker, client, headers, tally, budget, deadline, t0)
        nursery.cancel_scope.cancel()
    return tally, time.monotonic() - t0


def report(args: argparse.Namespace, tally: Tally, wall: float) -> str:
    """h2load's summary lines, as bench/load.py parses them."""
    statuses = [status for _, status, _ in tally.log]
    classes = [sum(1 for s in statuses if s // 100 == k) for k in (2, 3, 4, 5)]
    succeeded = sum(1 for s in statuses if s)
    failed = len(statuses) - succeeded
    protocol = "h3" if args.npn_list == "h3" else "h2"
    return "\n".join(
        [
            f"finished in {wall:.2f}s, {succeeded / wall:.2f} req/s, 0B/s",
            f"requests: {len(statuses)} total, {tally.started} started, {len(statuses)} done, "
            f"{succeeded} succeeded, {failed} failed, 0 errored, 0 timeout",
            f"status codes: {classes[0]} 2xx, {classes[1]} 3xx, {classes[2]} 4xx, {classes[3]} 5xx",
            "TLS Protocol: TLSv1.3",
            f"Application protocol: {protocol}",
        ]
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", type=int, default=1, help="connections")
    p.add_argument("-m", type=int, default=1, help="requests in flight per connection")
    p.add_argument("-n", type=int, default=0, help="requests in all (else -D)")
    p.add_argument("-D", type=float, default=0.0, help="seconds")
    p.add_argument("-t", type=int, default=1, help="threads: only 1 (accepted for h2load's argv)")
    p.add_argument("--npn-list", choices=("h3", "h2"), default="h3")
    p.add_argument("--log-file", help="one line per request: start us, status, duration us")
    p.add_argument("--connect-to", help="HOST:PORT to connect to instead of the URL's")
    p.add_argument("url")
    args = p.parse_args(argv)
    if not args.n and not args.D:
        p.error("give -n or -D")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tally, wall = trio.run(load, args)
    if args.log_file:
        with open(args.log_file, "w") as out:
            out.writelines(f"{start}\t{status}\t{took}\n" for start, status, took in tally.log)
    print(report(args, tally, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
