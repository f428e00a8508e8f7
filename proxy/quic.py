"""HTTP/3's UDP endpoint: QUIC connections (aioquic, sans-IO) driven by trio.

One task per UDP socket reads datagrams and hands each to its connection by destination
connection id. A new connection starts with a client Initial: its datagrams are held until
the ClientHello is whole (`proxy.tls.quic_hello`), whose server name picks the certificate
through the CertManager (the same rule as TCP, new certificates for new handshakes); only
then is a `QuicConnection` made, and fed what was held. Each connection is one task in the
server's `connections` nursery, counted by the `Lifecycle`, running aioquic's timer and its
HTTP/3 session's request tasks, and its sender: what is queued goes out once per scheduler
pass (coalesced across streams); a datagram the socket cannot take now is dropped, and QUIC's
loss recovery resends it.

Receive windows follow what the application took (`WindowedConnection`): aioquic alone doubles
them as data arrives, read or not.

Address validation: with `[http3] retry`, or once `retry_threshold` handshakes are in progress,
a new client's Initial is answered with a stateless Retry (aioquic's token: the address and
connection ids sealed with a key of the process, good for 30 s); only its second Initial,
carrying the token, starts a connection. SO_REUSEPORT hashes the client's 4-tuple, so the
second Initial reaches the worker that sealed the token.

No session tickets are issued, so there is no resumption and no 0-RTT (no replays). Address
migration is followed within a process (datagrams find their connection by id, whatever the
address; aioquic validates the new path), not across worker processes: SO_REUSEPORT hashes
the new address to any worker, which does not know the connection id and drops the packets,
and the client's connection times out (it reconnects, as after a NAT rebinding).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
)
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.quic.stream import QuicStream
from aioquic.tls import AlertDescription

from proxy.certs.manager import CertManager
from proxy.certs.store import StoredCert
from proxy.config import Http3Config, LimitsConfig
from proxy.connections import ConnectionRegistry, Slot
from proxy.http.h3 import H3Session, Handler, ReceiveLedger
from proxy.http.model import ConnectionInfo
from proxy.metrics import Metrics
from proxy.netio import bind_reusable
from proxy.tls.clienthello import ClientHello
from proxy.tls.quic_hello import CONNECTION_ID_LENGTH, HelloReader, InitialError

log = logging.getLogger(__name__)

MAX_HELD_DATAGRAMS = 8  # of one client's first flight, before its ClientHello is whole
RECEIVE_BATCH = 64  # datagrams read per wake-up before letting other tasks run
MAX_DATAGRAM = 65535
SUPPORTED_VERSIONS = QuicConfiguration().supported_versions


class _Quieter(logging.Filter):
    """aioquic logs each connection's course at INFO (version, ALPN, close) and a peer's
    protocol error at WARNING: routine network events, one step down here (DEBUG, INFO)."""

    LOWER = {logging.INFO: logging.DEBUG, logging.WARNING: logging.INFO}

    def filter(self, record: logging.LogRecord) -> bool:
        level = self.LOWER.get(record.levelno)
        if level is not None:
            record.levelno, record.levelname = level, logging.getLevelName(level)
        return _aioquic_log.isEnabledFor(record.levelno)


_aioquic_log = logging.getLogger("quic")
_aioquic_log.addFilter(_Quieter())


def termination_reason(code: int) -> str:
    """A bounded label for a handshake the peer or aioquic closed: the TLS alert's name
    (`bad_certificate`), else the QUIC error's (`protocol_violation`)."""
    crypto = QuicErrorCode.CRYPTO_ERROR
    try:
        if crypto <= code < crypto + 256:
            return AlertDescription(code - crypto).name
        return QuicErrorCode(code).name.lower()
    except ValueError:
        return "crypto_error" if crypto <= code < crypto + 256 else "unknown_error"


def bind_udp(address: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on the HTTPS port; SO_REUSEPORT as the TCP listeners."""
    return bind_reusable(address, port, socket.SOCK_DGRAM)


class WindowedConnection(QuicConnection):
    """A QuicConnection whose receive windows follow what the application took.

    aioquic raises a window (doubling it) whenever the peer used half of it, whether or not
    anything was read, so a client could push a body faster than the upstream takes it and
    the proxy would buffer it all. Here a window reaches the configured size past what the
    `ReceiveLedger` says was taken, raised once half of that was taken. The override is the
    two private methods writing MAX_STREAM_DATA and MAX_DATA; the frames and their loss
    handling stay aioquic's."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        original_destination_connection_id: bytes,
        retry_source_connection_id: bytes | None,
        ledger: ReceiveLedger,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self._ledger = ledger
        self._stream_window = configuration.max_stream_data
        self._connection_window = configuration.max_data

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        sid = stream.stream_id
        if stream.receiver.is_finished or sid is None:
            return  # all received (or a stream we only send on): no window to give
        window = self._stream_window
        wanted = stream.receiver.starting_offset() - self._ledger.held(sid) + window
        if wanted - stream.max_stream_data_local >= window // 2:
            stream.max_stream_data_local = wanted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(sid)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        max_data = self._local_max_data
        window = self._connection_window
        wanted = self._ledger.taken() + window
        if wanted - max_data.value >= window // 2:
            max_data.value = wanted
        # aioquic's rule (double once half is used) sees nothing used; it sends the frames
        used, max_data.used = max_data.used, 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used


class QuicEndpoint:
    """One UDP socket: routes datagrams to connections, starts new ones from Initials."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        certs: Callable[[], CertManager],
        limits: Callable[[], LimitsConfig],
        settings: Callable[[], Http3Config],
        handler: Handler,
        registry: ConnectionRegistry,
        metrics: Metrics,
        connections: trio.Nursery,
    ) -> None:
        self.sock = sock
        self.certs = certs
        self.limits = limits
        self.settings = settings
        self.handler = handler
        self.registry = registry
        self.metrics = metrics
        self._connections = connections
        self.by_cid: dict[bytes, QuicPeer] = {}
        self._configurations: dict[Path, tuple[tuple[object, ...], QuicConfiguration]] = {}
        self._retry = QuicRetryTokenHandler()
        self.handshaking = 0  # connections started whose handshake has not completed

    async def serve(self) -> None:
        """Read until cancelled (after the drain: connections need their datagrams)."""
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECEIVE_BATCH):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # an ICMP error reported on the socket
                    log.debug("UDP receive: %s", exc)
                    continue
                self._datagram(data, addr)
            await trio.lowlevel.checkpoint()

    def send(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:  # a full socket buffer: QUIC resends what was lost
            log.debug("UDP send to %s: %s", addr, exc)

    def _datagram(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH)
        except ValueError:
            return  # not QUIC: nothing to answer
        peer = self.by_cid.get(header.destination_cid)
        if peer is not None:
            peer.receive(data, addr)
            return
        # Only a full-size Initial (RFC 9000 §14.1) starts anything: no amplification.
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return
        if header.version not in SUPPORTED_VERSIONS:
            self.send(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=SUPPORTED_VERSIONS,
                ),
                addr,
            )
            return
        registry = self.registry
        if registry.draining or registry.full:
            return
        original_cid = self._validated(header, addr)
        if original_cid is None:
            return
        assert header.version is not None
        slot = registry.admit()
        slot.busy()  # a QUIC connection is not one of the idle TCP ones closed to make room
        retry_cid = None if original_cid == header.destination_cid else header.destination_cid
        peer = QuicPeer(
            self,
            slot,
            initial_cid=header.destination_cid,
            original_cid=original_cid,
            retry_cid=retry_cid,
            version=header.version,
            addr=addr,
        )
        self.by_cid[header.destination_cid] = peer
        self.handshaking += 1
        self._connections.start_soon(peer.run)
        peer.receive(data, addr)

    def _validated(self, header: QuicHeader, addr: NetworkAddress) -> bytes | None:
        """The client's original destination connection id when a connection may start now;
        None after answering with a Retry or dropping an invalid token."""
        if header.token:  # we issue no NEW_TOKEN tokens: this is our Retry's
            try:
                return self._retry.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=trio.current_time(),
                )
            except ValueError as exc:  # RFC 9000 §8.1.3 lets us drop it: no reply to spoofs
                log.debug("client %s: QUIC Retry token refused: %s", addr[0], exc)
                self.metrics.quic_handshake_failed("invalid_token")
                return None
        settings = self.settings()
        if not settings.retry and self.handshaking < settings.retry_threshold:
            return header.destination_cid
        assert header.version is not None
        retry_cid = os.urandom(CONNECTION_ID_LENGTH)
        token = self._retry.create_token(
            address=addr,
            original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=retry_cid,
            now=trio.current_time(),
        )
        self.send(
            encode_quic_retry(
                version=header.version,
                source_cid=retry_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            ),
            addr,
        )
        self.metrics.quic_retry_sent()
        return None

    async def configuration(self, cert: StoredCert) -> QuicConfiguration:
        """The server configuration for a certificate, built once per certificate serial and
        settings (a reload's new windows or idle timeout apply to new connections)."""
        settings, idle_timeout = self.settings(), self.limits().keepalive_timeout
        key = (cert.serial, idle_timeout, settings.stream_window, settings.connection_window)
        cached = self._configurations.get(cert.chain_path)
        if cached is not None and cached[0] == key:
            return cached[1]
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            idle_timeout=idle_timeout,
            connection_id_length=CONNECTION_ID_LENGTH,
            max_stream_data=settings.stream_window,
            max_data=settings.connection_window,
        )
        await trio.to_thread.run_sync(configuration.load_cert_chain, cert.chain_path, cert.key_path)
        self._configurations[cert.chain_path] = (key, configuration)
        return configuration


class QuicPeer:
    """One QUIC connection: from the first Initial until it is terminated."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        slot: Slot,
        *,
        initial_cid: bytes,
        original_cid: bytes,
        retry_cid: bytes | None,
        version: int,
        addr: NetworkAddress,
    ) -> None:
        self._endpoint = endpoint
        self._slot = slot
        self._original_cid = original_cid  # the client's first choice (before any Retry)
        self._retry_cid = retry_cid
        self._client_ip = str(addr[0])
        self._reader: HelloReader | None = HelloReader(initial_cid, version)
        self._held: list[tuple[bytes, NetworkAddress]] = []
        self._hello: ClientHello | None = None
        self._hello_done = trio.Event()
        self._quic: QuicConnection | None = None
        self._session: H3Session | None = None
        self._acknowledged = trio.Event()
        self._timer = trio.CancelScope()
        self._send_wanted = trio.Event()
        self._handshake_done = False
        self._failure_counted = False
        self._terminated = False
        self._refused = False

    # -- datagrams in ---------------------------------------------------------------------

    def receive(self, data: bytes, addr: NetworkAddress) -> None:
        if self._quic is not None:
            self._quic.receive_datagram(data, addr, trio.current_time())
            self._process()
            return
        if self._refused or len(self._held) >= MAX_HELD_DATAGRAMS:
            return
        self._held.append((data, addr))  # until the connection exists, then replayed
        if self._reader is None:
            return  # the hello is whole: waiting for its certificate
        try:
            hello = self._reader.feed(data)
        except InitialError as exc:
            log.debug("client %s: QUIC Initial refused: %s", self._client_ip, exc)
            self._handshake_failed("malformed_initial")
            self._give_up()
            return
        if hello is not None:
            self._hello = hello
            self._reader = None
            self._hello_done.set()

    def _give_up(self) -> None:
        self._refused = True
        self._reader = None
        self._held.clear()
        self._hello_done.set()

    # -- the connection's task ------------------------------------------------------------

    async def run(self) -> None:
        endpoint = self._endpoint
        self._slot.register(self)
        try:
            limits = endpoint.limits()
            with trio.move_on_after(limits.header_timeout):
                await self._hello_done.wait()
            if self._hello is not None:
                await self._serve(self._hello, limits)
            elif not self._hello_done.is_set():
                self._handshake_failed("hello_timeout")
        except Exception:  # a bug must cost this connection, not the process
            log.exception("client %s: QUIC connection failed", self._client_ip)
        finally:
            for cid in [cid for cid, peer in endpoint.by_cid.items() if peer is self]:
                del endpoint.by_cid[cid]
            if not self._handshake_done:
                endpoint.handshaking -= 1
            self._slot.unregister(self)
            self._slot.release()

    async def _serve(self, hello: ClientHello, limits: LimitsConfig) -> None:
        endpoint = self._endpoint
        cert = endpoint.certs().certificate_for(hello.server_name)
        if cert is None:
            log.info(
                "client %s: QUIC: no certificate for SNI %s", self._client_ip, hello.server_name
            )
            self._handshake_failed("no_certificate")
            return
        configuration = await endpoint.configuration(cert)
        ledger = ReceiveLedger()
        quic = WindowedConnection(
            configuration=configuration,
            original_destination_connection_id=self._original_cid,
            retry_source_connection_id=self._retry_cid,
            ledger=ledger,
        )
        endpoint.by_cid[quic.host_cid] = self
        info = ConnectionInfo(client_ip=self._client_ip, tls_version="TLSv1.3", alpn="h3")
        async with trio.open_nursery() as nursery:
            self._session = H3Session(self, quic, info, endpoint.handler, limits, nursery, ledger)
            self._quic = quic
            nursery.start_soon(self._handshake_deadline, limits.header_timeout)
            nursery.start_soon(self._sender, quic)
            held, self._held = self._held, []
            for data, addr in held:
                self.receive(data, addr)
            await self._run_timers(quic)
            nursery.cancel_scope.cancel()

    async def _handshake_deadline(self, timeout: float) -> None:
        await trio.sleep(timeout)
        if not self._handshake_done and self._quic is not None:
            log.info("client %s: QUIC handshake timed out", self._client_ip)
            self._handshake_failed("timeout")
            self._quic.close(reason_phrase="handshake timeout")
            self.transmit()

    async def _run_timers(self, quic: QuicConnection) -> None:
        """aioquic's timer (loss detection, idle timeout, closing): until terminated."""
        while not self._terminated:
            timer = quic.get_timer()
            with trio.CancelScope(deadline=math.inf if timer is None else timer) as self._timer:
                await trio.sleep_forever()
            timer = quic.get_timer()
            now = trio.current_time()
            if not self._terminated and timer is not None and now >= timer:
                quic.handle_timer(now)
                self._process()

    def _process(self) -> None:
        """Hand aioquic's events to the session, then send what they produced."""
        quic, session = self._quic, self._session
        assert quic is not None and session is not None
        while (event := quic.next_event()) is not None:
            if isinstance(event, ConnectionIdIssued):
                self._endpoint.by_cid[event.connection_id] = self
            elif isinstance(event, ConnectionIdRetired):
                self._endpoint.by_cid.pop(event.connection_id, None)
            elif isinstance(event, HandshakeCompleted):
                self._handshake_done = True
                self._endpoint.handshaking -= 1
                self._endpoint.metrics.tls_handshake_completed(session.info)
            elif isinstance(event, ConnectionTerminated):
                self._terminated = True
                self._handshake_failed(termination_reason(event.error_code))
                log.debug("client %s: QUIC connection closed: %r", self._client_ip, event)
            session.quic_event(event)
        self._acknowledged.set()
        self._acknowledged = trio.Event()
        self.transmit()

    def _handshake_failed(self, reason: str) -> None:
        """Counted once per connection, and only before its handshake completed."""
        if not self._handshake_done and not self._failure_counted:
            self._failure_counted = True
            self._endpoint.metrics.quic_handshake_failed(reason)

    # -- Transport (for the session) ------------------------------------------------------

    def transmit(self) -> None:
        """Send what aioquic queued once the tasks ready now had their turn: what several
        streams queue in one pass, and the acks for a batch of datagrams, share packets
        (each `datagrams_to_send` visits every stream of the connection)."""
        self._send_wanted.set()

    async def _sender(self, quic: QuicConnection) -> None:
        while True:
            await self._send_wanted.wait()
            self._send_wanted = trio.Event()
            for data, addr in quic.datagrams_to_send(trio.current_time()):
                self._endpoint.send(data, addr)
            timer = quic.get_timer()
            self._timer.deadline = (
                -math.inf if self._terminated else (math.inf if timer is None else timer)
            )

    async def acknowledged(self) -> None:
        await self._acknowledged.wait()

    # -- Drainable ------------------------------------------------------------------------

    def close_if_idle(self) -> None:
        """Drain: GOAWAY; in-flight requests finish, then the connection closes."""
        if self._session is not None and self._handshake_done:
            self._session.go_away()
        elif self._quic is not None:
            self._quic.close()
            self.transmit()
        else:
            self._give_up()
