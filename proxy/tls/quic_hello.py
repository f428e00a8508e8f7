"""The ClientHello of a QUIC client's first flight, read before any connection exists.

aioquic's TLS takes one certificate per configuration and has no SNI callback. Initial
packets are protected with keys derived from the client's chosen connection id (RFC 9001
§5.2), so the endpoint can decrypt them itself, reassemble the CRYPTO stream (clients split
and reorder it, and a post-quantum hello spans datagrams) and read the server name, as the
TCP listener peeks at the hello before OpenSSL sees it. Nothing here sends or keeps state
beyond one connection attempt.
"""

from __future__ import annotations

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from proxy.tls.clienthello import MAX_HELLO_LENGTH, ClientHello

CONNECTION_ID_LENGTH = 8  # of the ids this server issues (aioquic's default)

_PADDING, _PING, _ACK, _ACK_ECN, _CRYPTO = 0x00, 0x01, 0x02, 0x03, 0x06
_HANDSHAKE_HEADER = 4


class InitialError(ValueError):
    """Not the first flight of a QUIC client we can serve: drop it."""


class HelloReader:
    """Collects the CRYPTO frames of one client's Initial packets until its ClientHello is
    whole. `feed` each datagram sent to the client's original connection id."""

    def __init__(self, destination_cid: bytes, version: int) -> None:
        self._crypto = CryptoPair()
        self._crypto.setup_initial(cid=destination_cid, is_client=False, version=version)
        self._fragments: dict[int, bytes] = {}  # CRYPTO offset -> data
        self._received = 0

    def feed(self, datagram: bytes) -> ClientHello | None:
        """The hello once complete, else None; raises InitialError."""
        buf = Buffer(data=datagram)
        while not buf.eof():
            start = buf.tell()
            try:
                header = pull_quic_header(buf, host_cid_length=CONNECTION_ID_LENGTH)
            except ValueError as exc:
                if start:
                    break  # padding after the packets, as clients send (RFC 9000 §14.1)
                raise InitialError(f"bad packet header: {exc}") from exc
            end = start + header.packet_length
            encrypted_offset = buf.tell() - start
            buf.seek(min(end, len(datagram)))
            if header.packet_type != QuicPacketType.INITIAL:
                continue  # 0-RTT coalesced behind the Initial: QuicConnection's business
            try:
                _, payload, _ = self._crypto.decrypt_packet(
                    datagram[start:end], encrypted_offset, 0
                )
            except ValueError as exc:  # CryptoError
                raise InitialError(f"undecryptable Initial: {exc}") from exc
            self._read_frames(payload)
        return self._hello()

    def _read_frames(self, payload: bytes) -> None:
        buf = Buffer(data=payload)
        try:
            while not buf.eof():
                frame = buf.pull_uint_var()
                if frame in (_PADDING, _PING):
                    continue
                if frame in (_ACK, _ACK_ECN):
                    # largest, delay, the range count; then the first range, the ranges
                    buf.pull_uint_var()
                    buf.pull_uint_var()
                    ranges = buf.pull_uint_var()
                    fields = 1 + 2 * ranges + (3 if frame == _ACK_ECN else 0)
                    for _ in range(fields):
                        buf.pull_uint_var()
                elif frame == _CRYPTO:
                    offset = buf.pull_uint_var()
                    data = buf.pull_bytes(buf.pull_uint_var())
                    self._received += len(data)
                    if offset + len(data) > MAX_HELLO_LENGTH or self._received > MAX_HELLO_LENGTH:
                        raise InitialError("ClientHello too large")
                    self._fragments[offset] = data
                else:  # CONNECTION_CLOSE or a frame an Initial must not carry
                    raise InitialError(f"frame type {frame:#x} before the ClientHello")
        except ValueError as exc:
            raise InitialError(f"malformed Initial frames: {exc}") from exc

    def _contiguous(self) -> bytes:
        """The CRYPTO stream from offset 0 up to its first gap."""
        out = bytearray()
        progress = True
        while progress:
            progress = False
            for offset, data in self._fragments.items():
                if offset <= len(out) < offset + len(data):
                    out += data[len(out) - offset :]
                    progress = True
        return bytes(out)

    def _hello(self) -> ClientHello | None:
        stream = self._contiguous()
        if len(stream) < _HANDSHAKE_HEADER:
            return None
        if stream[0] != tls.HandshakeType.CLIENT_HELLO:
            raise InitialError("the CRYPTO stream does not start with a ClientHello")
        length = int.from_bytes(stream[1:4], "big")
        if length > MAX_HELLO_LENGTH:
            raise InitialError("ClientHello too large")
        if len(stream) < _HANDSHAKE_HEADER + length:
            return None
        try:
            hello = tls.pull_client_hello(Buffer(data=stream[: _HANDSHAKE_HEADER + length]))
        except (ValueError, tls.Alert) as exc:
            raise InitialError(f"malformed ClientHello: {exc}") from exc
        name = hello.server_name.lower() if hello.server_name else None
        return ClientHello(server_name=name, alpn=tuple(hello.alpn_protocols or ()))
