"""Transport connections to one upstream: TCP, plus verified TLS for https:// upstreams.

The connector settles which protocol a new connection speaks: the scheme says so for
http:// and h2c://, ALPN for https:// (h2 preferred, as the upstream chooses).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Literal

import trio

from proxy.config import Upstream
from proxy.netio import ByteStream, SocketStream, connect_tcp
from proxy.tls.policy import client_context
from proxy.tls.stream import TLSStream

Protocol = Literal["h2", "http/1.1"]
UPSTREAM_ALPN: tuple[Protocol, ...] = ("h2", "http/1.1")


@dataclass(slots=True)
class Transport:
    stream: ByteStream
    socket: socket.socket  # for synchronous close and idle checks
    protocol: Protocol


class OtherProtocol(Exception):
    """ALPN picked another protocol than the pool that connected speaks; the pool of that
    protocol takes over the connection."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(f"upstream chose {transport.protocol}")
        self.transport = transport


class Connector:
    """Opens connections to one upstream within the connect timeout."""

    def __init__(self, upstream: Upstream, connect_timeout: float) -> None:
        self.upstream = upstream
        self._timeout = connect_timeout
        self._server_name = upstream.server_name or upstream.host
        self._tls = (
            client_context(upstream.ca, UPSTREAM_ALPN) if upstream.scheme == "https" else None
        )

    async def connect(self) -> Transport:
        """Raises OSError (refused, unreachable, TLS failure with its reason) or StreamTimeout."""
        upstream = self.upstream
        deadline = trio.current_time() + self._timeout
        sock = await connect_tcp(upstream.host, upstream.port, deadline)
        if self._tls is None:
            return Transport(
                SocketStream(sock), sock, "h2" if upstream.scheme == "h2c" else "http/1.1"
            )
        stream = TLSStream(sock, self._tls, server_side=False, server_hostname=self._server_name)
        try:
            await stream.do_handshake(deadline)
        except ssl.SSLCertVerificationError as exc:
            await stream.aclose()
            raise OSError(
                f"TLS certificate verification failed for {self._server_name}: {exc.verify_message}"
            ) from exc
        except ssl.SSLError as exc:
            await stream.aclose()
            raise OSError(f"TLS handshake failed: {exc.reason or exc}") from exc
        except BaseException:
            await stream.aclose()
            raise
        protocol: Protocol = "h2" if stream.alpn_protocol == "h2" else "http/1.1"
        return Transport(stream, stream.socket, protocol)
