"""The PROXY protocol header (HAProxy's, versions 1 and 2) at the start of a connection; no I/O.

An L4 load balancer in front of the proxy prepends it to say who its client is. Version 1 is
a text line (`PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`, at most 107 bytes), version 2
a binary block (a 12-byte signature, version/command, family/transport, length, addresses,
TLVs). Both are told apart by their first bytes, so a listener accepts either. Only the
source address is kept: it becomes the connection's client address. LOCAL (v2), UNKNOWN (v1)
and address families without an IP (unspecified, unix) leave the connection's own peer as the
client, as the specification asks. TLVs are checked to be well framed, then skipped.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the longest v1 line, CRLF included (TCP6 with full addresses)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16  # signature, version/command, family/transport, 2-byte length
MAX_HEADER_LENGTH = V2_HEADER_LENGTH + 0xFFFF  # v2's length field bounds every header

_V2_LOCAL, _V2_PROXY = 0x20, 0x21  # version 2 in the high nibble, the command in the low
# The family/transport bytes the specification defines -> the address block's length:
# unspecified; TCP and UDP over IPv4, over IPv6; unix stream and datagram.
_V2_ADDRESS_LENGTHS = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_TLV_HEADER = 3  # type, 2-byte length


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header."""


class NotProxyProtocol(ProxyProtocolError):
    """The bytes start like something else (TLS, HTTP): no PROXY header was sent."""


class Signature(enum.Enum):
    """What the first bytes of a connection are."""

    NONE = "none"  # not a PROXY header
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes the header takes at the start of the stream
    client: str | None  # the source IP; None: use the connection's own peer (LOCAL, UNKNOWN)


def signature(data: bytes) -> Signature | int:
    """Which PROXY version `data` starts with, or, while `data` could still be the start of
    either signature, how many bytes in all decide it."""
    for prefix, kind in ((V1_PREFIX, Signature.V1), (V2_SIGNATURE, Signature.V2)):
        if data.startswith(prefix):
            return kind
    for prefix in (V1_PREFIX, V2_SIGNATURE):
        if prefix.startswith(data):
            return len(data) + 1
    return Signature.NONE


def parse_proxy_header(data: bytes) -> ProxyHeader | int:
    """The PROXY header at the start of `data`, or the number of bytes needed in all before
    parsing can go on (always more than `len(data)`, never more than MAX_HEADER_LENGTH).
    Raises NotProxyProtocol if `data` starts with something else, ProxyProtocolError if the
    header is malformed."""
    kind = signature(data)
    if isinstance(kind, int):
        return kind
    if kind is Signature.V1:
        return _parse_v1(data)
    if kind is Signature.V2:
        return _parse_v2(data)
    raise NotProxyProtocol("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 line longer than {V1_MAX_LENGTH} bytes")
        return len(data) + 1
    fields = data[len(V1_PREFIX) : end].split(b" ")
    length = end + 2
    if fields[0] == b"UNKNOWN":  # anything may follow; the receiver ignores it
        return ProxyHeader(length=length, client=None)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"bad v1 line {data[:end]!r}")
    family = ipaddress.IPv4Address if fields[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        source, _ = (family(field.decode("ascii")) for field in fields[1:3])
    except (ValueError, UnicodeDecodeError):
        raise ProxyProtocolError(f"bad v1 address in {data[:end]!r}") from None
    for port in fields[3:]:
        if not _is_port(port):
            raise ProxyProtocolError(f"bad v1 port {port!r}")
    return ProxyHeader(length=length, client=str(source))


def _is_port(text: bytes) -> bool:
    """Decimal 0-65535 without leading zeros, as the specification writes them."""
    return (
        0 < len(text) <= 5
        and text.isdigit()
        and (text == b"0" or not text.startswith(b"0"))
        and int(text) <= 0xFFFF
    )


def _parse_v2(data: bytes) -> ProxyHeader | int:
    if len(data) < V2_HEADER_LENGTH:
        return V2_HEADER_LENGTH
    command, family = data[12], data[13]
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"bad v2 version/command byte {command:#04x}")
    address_length = _V2_ADDRESS_LENGTHS.get(family)
    if command == _V2_PROXY and address_length is None:
        raise ProxyProtocolError(f"bad v2 family/transport byte {family:#04x}")
    length = V2_HEADER_LENGTH + int.from_bytes(data[14:16], "big")
    if len(data) < length:
        return length
    if command == _V2_LOCAL or address_length is None:
        # The balancer's own connection (a health check): whatever follows is discarded.
        return ProxyHeader(length=length, client=None)
    body = data[V2_HEADER_LENGTH:length]
    if len(body) < address_length:
        raise ProxyProtocolError(f"v2 address block of {len(body)} bytes, needs {address_length}")
    _check_tlvs(body[address_length:])
    client: str | None = None
    if family >> 4 == 0x1:
        client = str(ipaddress.IPv4Address(body[:4]))
    elif family >> 4 == 0x2:
        client = str(ipaddress.IPv6Address(body[:16]))
    return ProxyHeader(length=length, client=client)


def _check_tlvs(tlvs: bytes) -> None:
    """Each TLV must fit in what is left of the header."""
    pos = 0
    while pos < len(tlvs):
        if pos + _TLV_HEADER > len(tlvs):
            raise ProxyProtocolError("truncated v2 TLV")
        pos += _TLV_HEADER + int.from_bytes(tlvs[pos + 1 : pos + 3], "big")
        if pos > len(tlvs):
            raise ProxyProtocolError("v2 TLV longer than the header")
