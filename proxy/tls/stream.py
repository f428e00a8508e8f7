"""TLS over a raw non-blocking socket: accepted client connections and https upstreams.

`ssl.SSLSocket` does the record layer in C; we only translate its want-read/want-write
signals into trio readiness waits. This is several times cheaper per request than
`trio.SSLStream` over `trio.SocketStream` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl

from proxy.config import ClientAuth
from proxy.netio import (
    NO_DEADLINE,
    RECEIVE_SIZE,
    close_socket,
    peek_until,
    wait_readable,
    wait_writable,
)
from proxy.tls.client_cert import ClientCertificate
from proxy.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    Incomplete,
    parse_client_hello,
)
from proxy.tls.policy import ServerContext, verification_error

log = logging.getLogger(__name__)


class TLSStream:
    """One TLS connection, accepted (server side) or to an upstream (client side, verifying
    `server_hostname`). Only one task may receive and one may send at a time."""

    __slots__ = ("_ssl",)

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        # wrap_socket takes over the file descriptor; `sock` is detached afterwards.
        self._ssl = context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=True,
        )
        self._ssl.setblocking(False)

    @property
    def socket(self) -> ssl.SSLSocket:
        return self._ssl

    @property
    def alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    @property
    def client_auth(self) -> ClientAuth | None:
        """The client-certificate settings the handshake ran under (None: none asked for)."""
        context = self._ssl.context
        return context.client_auth if isinstance(context, ServerContext) else None

    @property
    def client_certificate(self) -> ClientCertificate | None:
        """The peer's certificate once the handshake is done, if it sent one that verified
        (a site that only requests certificates lets an unverified one through)."""
        der = self._ssl.getpeercert(binary_form=True)
        if der is None:
            return None
        error = verification_error(self._ssl)
        if error is not None:
            log.debug("client certificate not verified: %s", error)
            return None
        try:
            return ClientCertificate.from_der(der)
        except ValueError as exc:  # OpenSSL accepted what `cryptography` cannot read
            log.info("client certificate verified but unreadable, taken as none: %s", exc)
            return None

    async def do_handshake(self, deadline: float = NO_DEADLINE) -> None:
        """Complete the handshake; ssl.SSLError on a failed one, StreamTimeout if too slow."""
        tls = self._ssl
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                await wait_readable(tls, deadline)
            except ssl.SSLWantWriteError:
                await wait_writable(tls, deadline)

    async def receive_some(self, deadline: float = NO_DEADLINE) -> bytes:
        """Up to 64 KiB of plaintext, or b"" at EOF (close_notify, TCP FIN or reset)."""
        tls = self._ssl
        while True:
            try:
                return tls.recv(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                await wait_readable(tls, deadline)
            except ssl.SSLWantWriteError:
                await wait_writable(tls, deadline)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
                return b""

    async def wait_readable(self, deadline: float = NO_DEADLINE) -> None:
        if not self._ssl.pending():  # plaintext OpenSSL already decrypted needs no wait
            await wait_readable(self._ssl, deadline)

    async def send_all(self, data: bytes | memoryview, deadline: float = NO_DEADLINE) -> None:
        """Encrypt and send everything. OpenSSL keeps a partly sent record and wants the
        same buffer again on retry, so we only advance by what `send` reports written."""
        tls = self._ssl
        view = memoryview(data)
        while view:
            try:
                sent = tls.send(view)
            except ssl.SSLWantWriteError:
                await wait_writable(tls, deadline)
                continue
            except ssl.SSLWantReadError:
                await wait_readable(tls, deadline)
                continue
            except ssl.SSLEOFError as exc:
                raise BrokenPipeError(str(exc)) from exc
            view = view[sent:]

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it right away, then close. Waiting for the
        peer's close_notify gains nothing for HTTP (message framing already ended)."""
        tls = self._ssl
        if tls.fileno() == -1:
            return
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            tls.unwrap()
        close_socket(tls)


async def peek_client_hello(sock: socket.socket, deadline: float) -> ClientHello:
    """Read SNI and ALPN without consuming anything, so OpenSSL later sees the whole hello.

    Raises ClientHelloError for non-TLS bytes, EOFError if the client leaves first,
    StreamTimeout past the deadline (see `peek_until`: a stalled hello costs no wake-ups).
    """
    return await peek_until(sock, deadline, MAX_CLIENT_HELLO_BYTES, _hello_or_needed)


def _hello_or_needed(data: bytes) -> ClientHello | int:
    hello = parse_client_hello(data)
    return hello.needed if isinstance(hello, Incomplete) else hello
