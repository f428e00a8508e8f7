"""PROXY protocol headers built by hand from the specification (haproxy's proxy-protocol.txt),
independently of the parser under test."""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x20, 0x21  # version 2, command


def v1(source: str, destination: str, source_port: int = 40000, port: int = 443) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {port}\r\n".encode()


def v2(
    source: str | None = None,
    destination: str | None = None,
    *,
    command: int = PROXY,
    tlvs: bytes = b"",
    source_port: int = 40000,
    port: int = 443,
) -> bytes:
    """A v2 header over TCP; without addresses, family UNSPEC."""
    if source is None or destination is None:
        family, addresses = 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        family = 0x11 if src.version == 4 else 0x21
        addresses = src.packed + dst.packed + struct.pack("!HH", source_port, port)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
