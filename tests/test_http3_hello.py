"""The server name read out of a QUIC client's Initial packets, without any network."""

from __future__ import annotations

import pytest
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from proxy.tls.clienthello import ClientHello
from proxy.tls.quic_hello import CONNECTION_ID_LENGTH, HelloReader, InitialError


def _first_flight(server_name: str) -> list[bytes]:
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, server_name=server_name
        )
    )
    client.connect(("127.0.0.1", 443), now=0.0)
    return [data for data, _ in client.datagrams_to_send(now=0.0)]


def _reader(datagram: bytes) -> HelloReader:
    header = pull_quic_header(Buffer(data=datagram), host_cid_length=CONNECTION_ID_LENGTH)
    assert header.version is not None
    return HelloReader(header.destination_cid, header.version)


def test_server_name_and_alpn_from_the_first_initial() -> None:
    flight = _first_flight("Example.COM")
    reader = _reader(flight[0])
    assert reader.feed(flight[0]) == ClientHello(server_name="example.com", alpn=("h3",))


def test_a_damaged_initial_is_refused() -> None:
    flight = _first_flight("example.com")
    damaged = bytearray(flight[0])
    damaged[60] ^= 0xFF  # inside the protected payload: the AEAD tag no longer matches
    with pytest.raises(InitialError):
        _reader(flight[0]).feed(bytes(damaged))


def test_an_initial_under_another_connection_id_is_refused() -> None:
    flight = _first_flight("example.com")
    with pytest.raises(InitialError):
        HelloReader(b"\x01" * 8, 1).feed(flight[0])
