"""HTTP/3 pieces without a proxy process: receive windows that follow what the application
took (`WindowedConnection`, the override of aioquic's private window updates: an aioquic
client and the proxy's server connection exchanging datagrams in memory), the labels of
failed handshakes, and the [http3] table."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import Http3Config
from proxy.config_load import ConfigError, load_config
from proxy.http.h3 import ReceiveLedger, h3_unparsed, send_backlog
from proxy.quic import WindowedConnection, termination_reason
from proxy.tls.quic_hello import CONNECTION_ID_LENGTH

STREAM_WINDOW = 64 * 1024
CONNECTION_WINDOW = 160 * 1024
ADDRESS = ("127.0.0.1", 4433)


def _server_configuration() -> QuicConfiguration:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        connection_id_length=CONNECTION_ID_LENGTH,
        max_stream_data=STREAM_WINDOW,
        max_data=CONNECTION_WINDOW,
    )
    configuration.certificate = cert
    configuration.private_key = key
    return configuration


class Pair:
    """A client and the windowed server; `received` counts what the server delivered per
    stream, all of it held until `take` (as unread request bodies are)."""

    def __init__(self) -> None:
        client_configuration = QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, server_name="localhost", verify_mode=0
        )
        self.client = QuicConnection(configuration=client_configuration)
        self.client.connect(ADDRESS, now=0.0)
        self.ledger = ReceiveLedger()
        self.server = WindowedConnection(
            configuration=_server_configuration(),
            original_destination_connection_id=self.client.original_destination_connection_id,
            retry_source_connection_id=None,
            ledger=self.ledger,
        )
        self.received: dict[int, int] = {}
        self.now = 0.0
        self.pump()

    def pump(self) -> None:
        """Datagrams both ways until neither side has anything to send."""
        for _ in range(10_000):
            self.now += 0.001
            moved = False
            for sender, receiver in ((self.client, self.server), (self.server, self.client)):
                for data, _ in sender.datagrams_to_send(now=self.now):
                    receiver.receive_datagram(data, ADDRESS, now=self.now)
                    moved = True
            while (event := self.server.next_event()) is not None:
                if isinstance(event, StreamDataReceived):
                    self.received[event.stream_id] = self.received.get(event.stream_id, 0) + len(
                        event.data
                    )
                    self.ledger.delivered += len(event.data)
                    self.ledger.hold(
                        event.stream_id, self.ledger.held(event.stream_id) + len(event.data)
                    )
            while self.client.next_event() is not None:
                pass
            if not moved:
                return
        raise AssertionError("the connections never went quiet")

    def send(self, stream_id: int, size: int) -> None:
        self.client.send_stream_data(stream_id, bytes(size))
        self.pump()

    def take(self, stream_id: int, size: int) -> None:
        self.ledger.hold(stream_id, self.ledger.held(stream_id) - size)
        self.pump()


def test_a_stream_window_opens_only_as_far_as_was_taken() -> None:
    pair = Pair()
    pair.send(0, 1024 * 1024)
    assert pair.received[0] == STREAM_WINDOW  # aioquic alone would have doubled it on
    pair.take(0, STREAM_WINDOW // 4)
    assert pair.received[0] == STREAM_WINDOW  # less than half taken: no update yet
    pair.take(0, STREAM_WINDOW // 4)
    assert pair.received[0] == STREAM_WINDOW + STREAM_WINDOW // 2
    pair.take(0, pair.ledger.held(0))
    assert pair.received[0] == 2 * STREAM_WINDOW + STREAM_WINDOW // 2


def test_the_connection_window_caps_all_streams_together() -> None:
    pair = Pair()
    for stream_id in (0, 4, 8):
        pair.client.send_stream_data(stream_id, bytes(STREAM_WINDOW))
    pair.pump()
    assert sum(pair.received.values()) == CONNECTION_WINDOW
    pair.take(0, pair.ledger.held(0))  # 64 KiB taken: more than half the connection window?
    assert sum(pair.received.values()) == CONNECTION_WINDOW  # no: 64 < 80 KiB
    pair.take(4, pair.ledger.held(4))
    assert sum(pair.received.values()) == 3 * STREAM_WINDOW  # all three streams' bytes


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate, "bad_certificate"),
        (QuicErrorCode.CRYPTO_ERROR + 0xFE, "crypto_error"),  # no such alert
        (QuicErrorCode.PROTOCOL_VIOLATION, "protocol_violation"),
        (0x1234, "unknown_error"),
    ],
)
def test_handshake_failure_reasons_are_bounded_names(code: int, reason: str) -> None:
    assert termination_reason(code) == reason


def test_http3_table(tmp_path: Path) -> None:
    path = tmp_path / "port443.toml"
    site = '[[sites]]\nhosts = ["localhost"]\nupstreams = ["http://127.0.0.1:8080"]\n'
    path.write_text(
        site + "[http3]\nretry = true\nretry_threshold = 5\n"
        "stream_window = 65536\nconnection_window = 65536\n"
    )
    assert load_config(path).http3 == Http3Config(
        retry=True, retry_threshold=5, stream_window=65536, connection_window=65536
    )
    path.write_text(
        site + "[http3]\nretry_threshold = -1\nburst = 2\n"
        "stream_window = 1048576\nconnection_window = 524288\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 3, info.value.problems
    assert "retry_threshold: must be an integer >= 0, got -1" in str(info.value)
    assert "burst" in str(info.value)
    assert "connection_window: must be >= http3.stream_window" in str(info.value)


def test_aioquic_chatter_is_one_level_down(caplog: pytest.LogCaptureFixture) -> None:
    """aioquic's INFO (a connection's course) is DEBUG, its WARNING (a peer's protocol
    error) INFO: at the usual `info` level only the latter shows (importing proxy.quic
    installed the filter)."""
    caplog.set_level(logging.INFO, logger="quic")
    quic_log = logging.getLogger("quic")
    quic_log.info("ALPN negotiated protocol h3")
    quic_log.warning("Over connection data limit")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Over connection data limit")
    ]


def test_send_backlog_reads_aioquics_unacknowledged_bytes() -> None:
    """Pins the private sender state `send_backlog` reads."""
    pair = Pair()
    pair.client.send_stream_data(0, bytes(5000))
    assert send_backlog(pair.client, 0) == send_backlog(pair.client) == 5000
    pair.pump()
    assert send_backlog(pair.client) == 0  # acknowledged
    pair.client.send_stream_data(4, bytes(100))
    pair.client.reset_stream(4, 0)
    assert send_backlog(pair.client, 4) == 0  # a reset stream's bytes are never sent


def test_h3_unparsed_reads_h3s_partial_frames() -> None:
    """Pins the private per-stream buffer `h3_unparsed` reads: a HEADERS frame is kept
    whole until it is complete."""
    pair = Pair()
    h3 = H3Connection(pair.server)
    partial = b"\x01\x40\x40" + bytes(10)  # HEADERS of 64 bytes, 10 of them here
    h3.handle_event(StreamDataReceived(data=partial, end_stream=False, stream_id=0))
    assert 10 <= h3_unparsed(h3, 0) <= len(partial)
    assert h3_unparsed(h3, 4) == 0
