"""[listen] proxy_protocol on an accepted connection: who its client is, before TLS or HTTP.

Peers in `proxy_protocol_from` (the L4 balancers) must start with a PROXY header (v1 or v2),
whose source address then is the client for everything after (trusted_proxies, forwarded
headers, logs, per-client limits, hashing). Any other peer is its own client; a PROXY header
from it closes the connection, as nginx does: it could otherwise pose as any client. The
header is peeked, then exactly its bytes are read, so the TLS ClientHello peek or h11 that
follows sees the stream as if the header had never been there.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from proxy.config import IPNetwork
from proxy.lograte import RateLimitedLog
from proxy.netio import StreamTimeout, peek_until
from proxy.proxy_protocol import (
    MAX_HEADER_LENGTH,
    V2_SIGNATURE,
    NotProxyProtocol,
    ProxyProtocolError,
    Signature,
    parse_proxy_header,
    signature,
)
from proxy.routing.identity import is_trusted

log = logging.getLogger(__name__)

REASONS = ("missing", "malformed", "truncated", "timeout", "untrusted")


class Rejected(Exception):
    """The connection must close. `reason` (one of REASONS) is counted and logged; None: a
    peer not expected to send a header sent nothing in time, which is no PROXY matter."""

    def __init__(self, reason: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ProxyProtocolGate:
    """The PROXY protocol policy of the HTTPS and HTTP listeners (not HTTP/3: UDP has none)."""

    def __init__(
        self,
        sources: tuple[IPNetwork, ...],
        timeout: Callable[[], float],
        rejected: Callable[[str], None],
    ) -> None:
        self._sources = sources
        self._timeout = timeout  # the handshake timeout in force ([limits] header_timeout)
        self._rejected = rejected
        self._logs = {reason: RateLimitedLog(log, logging.WARNING) for reason in REASONS}

    def expects(self, peer: str) -> bool:
        """Whether `peer` must send a PROXY header (it is in proxy_protocol_from)."""
        return is_trusted(peer, self._sources)

    async def client_address(self, sock: socket.socket, peer: str, *, expected: bool) -> str:
        """The connection's client: the header's source from an `expected` peer (the peer
        itself for LOCAL and UNKNOWN), else the peer; the header's bytes are consumed.
        Raises Rejected."""
        deadline = trio.current_time() + self._timeout()
        if not expected:
            try:
                found = await peek_until(sock, deadline, len(V2_SIGNATURE), signature)
            except (EOFError, StreamTimeout, OSError) as exc:
                raise Rejected(None, f"nothing sent: {exc!r}") from None
            if found is not Signature.NONE:
                raise Rejected("untrusted", "a PROXY header from a peer not in proxy_protocol_from")
            return peer
        try:
            header = await peek_until(sock, deadline, MAX_HEADER_LENGTH, parse_proxy_header)
            if len(sock.recv(header.length)) != header.length:
                raise EOFError("the header's bytes vanished")  # peeked, so always there
        except NotProxyProtocol as exc:
            raise Rejected("missing", str(exc)) from None
        except ProxyProtocolError as exc:
            raise Rejected("malformed", str(exc)) from None
        except StreamTimeout:
            raise Rejected("timeout", "no complete header in time") from None
        except (EOFError, OSError) as exc:
            raise Rejected("truncated", f"connection ended: {exc}") from None
        return header.client or peer

    def report(self, peer: str, rejected: Rejected) -> None:
        """Count and log a rejection (at most one line per reason per 10 s)."""
        if rejected.reason is None:
            log.debug("client %s: closed before its first bytes: %s", peer, rejected)
            return
        self._rejected(rejected.reason)
        self._logs[rejected.reason](
            "client %s: PROXY protocol %s: %s; connection closed", peer, rejected.reason, rejected
        )
