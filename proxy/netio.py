"""Byte streams over raw non-blocking sockets, driven by trio's readiness waits.

trio's SocketStream/SSLStream layers cost more CPU per request than the protocol work itself,
so the hot path talks to the socket directly: try the syscall, and only when it would block,
wait for readiness. Timeouts are absolute trio deadlines and cost next to nothing.
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

RECEIVE_SIZE = 65536
NO_DEADLINE = math.inf


class StreamTimeout(Exception):
    """The peer did not make progress before the deadline."""


class ByteStream(Protocol):
    """What the HTTP front ends need from a connection: plain TCP or TLS."""

    __slots__ = ()  # slotted implementations stay slotted

    async def receive_some(self, deadline: float = NO_DEADLINE) -> bytes: ...

    async def wait_readable(self, deadline: float = NO_DEADLINE) -> None:
        """Wait for input when a reply cannot have arrived yet: cheaper than a failed read."""
        ...

    async def send_all(self, data: bytes | memoryview, deadline: float = NO_DEADLINE) -> None: ...

    async def aclose(self) -> None: ...


# Deadlines of readiness waits are enforced by one reaper per trio run instead of a cancel
# scope per wait: a scope costs ~6 µs to enter and leave, and a proxied request blocks two or
# three times, which made timeout bookkeeping a tenth of the request's CPU. The reaper wakes
# every REAPER_TICK, and wakes overdue waiters through trio's notify_closing; a timeout thus
# fires up to REAPER_TICK late, which no HTTP timeout cares about.
REAPER_TICK = 0.25
# Keyed by (socket, readable): a reader and a writer may wait on one socket at once (HTTP/2).
Waiting = dict[tuple[socket.socket, bool], float]
_waiting: trio.lowlevel.RunVar[Waiting] = trio.lowlevel.RunVar("netio_waiting")


def _waiting_sockets() -> Waiting:
    try:
        return _waiting.get()
    except LookupError:
        waiting: Waiting = {}
        _waiting.set(waiting)
        trio.lowlevel.spawn_system_task(_reap_overdue, waiting, name="netio deadline reaper")
        return waiting


async def _reap_overdue(waiting: Waiting) -> None:
    while True:
        await trio.sleep(REAPER_TICK)
        now = trio.current_time()
        for key, deadline in list(waiting.items()):
            if deadline <= now:
                del waiting[key]
                trio.lowlevel.notify_closing(key[0])


async def _wait(sock: socket.socket, deadline: float, readable: bool) -> None:
    wait = trio.lowlevel.wait_readable if readable else trio.lowlevel.wait_writable
    if deadline == NO_DEADLINE:
        await wait(sock)
        return
    waiting = _waiting_sockets()
    key = (sock, readable)
    waiting[key] = deadline
    try:
        await wait(sock)
    except trio.ClosedResourceError as exc:
        if trio.current_time() >= deadline:
            # The reaper told trio this socket closes (notify_closing): close it now, so no
            # later call can use it half-forgotten; any further I/O raises OSError (EBADF).
            sock.close()
            raise StreamTimeout from None
        raise ConnectionAbortedError(f"socket closed while waiting: {exc}") from exc
    finally:
        waiting.pop(key, None)


async def wait_readable(sock: socket.socket, deadline: float) -> None:
    """Wait until `sock` is readable; StreamTimeout past `deadline`, and the socket is then
    closed: a stream that timed out is gone."""
    await _wait(sock, deadline, readable=True)


async def wait_writable(sock: socket.socket, deadline: float) -> None:
    """Wait until `sock` is writable; StreamTimeout past `deadline`, as wait_readable."""
    await _wait(sock, deadline, readable=False)


Parsed = TypeVar("Parsed")


async def peek_until(
    sock: socket.socket, deadline: float, limit: int, parse: Callable[[bytes], Parsed | int]
) -> Parsed:
    """What `parse` makes of the first bytes of `sock`, peeked without consuming them (up to
    `limit`); `parse` returns its result, or how many bytes it needs in all (an int).

    A peeked socket stays readable, so while the bytes are short SO_RCVLOWAT holds back
    readiness until the bytes `parse` needs are there: a stalled peer costs no wake-ups.
    Raises what `parse` raises, EOFError if the peer leaves first (or the kernel wakes us
    short of those bytes: nothing more can come without reading), StreamTimeout past the
    deadline.
    """
    needed = 1
    try:
        while True:
            try:
                data = sock.recv(limit, socket.MSG_PEEK)
            except BlockingIOError:
                await wait_readable(sock, deadline)
                continue
            if len(data) < needed:
                raise EOFError(f"peer stopped after {len(data)} bytes")
            result = parse(data)
            if not isinstance(result, int):
                return result
            needed = result
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
            await wait_readable(sock, deadline)
    finally:
        # Later reads wait for readiness too: back to any byte (unless a timeout closed it).
        if needed > 1 and sock.fileno() != -1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def bind_reusable(address: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket bound to `address`:`port` (TCP or UDP). SO_REUSEPORT lets worker
    processes share the port; IPv6 sockets are v6-only so "0.0.0.0" and "::" can be listed
    side by side."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def close_socket(sock: socket.socket) -> None:
    """Close a socket other tasks may be waiting on, waking them first (trio requires it)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()


class SocketStream(ByteStream):
    """A plain TCP connection: the port-80 redirector and upstream connections use it."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock

    async def receive_some(self, deadline: float = NO_DEADLINE) -> bytes:
        """Up to 64 KiB, or b"" at EOF. A reset connection reads as EOF."""
        sock = self.socket
        while True:
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                await wait_readable(sock, deadline)
            except ConnectionResetError:
                return b""

    async def wait_readable(self, deadline: float = NO_DEADLINE) -> None:
        await wait_readable(self.socket, deadline)

    async def send_all(self, data: bytes | memoryview, deadline: float = NO_DEADLINE) -> None:
        sock = self.socket
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await wait_writable(sock, deadline)
                continue
            view = view[sent:]

    async def aclose(self) -> None:
        close_socket(self.socket)


async def connect_tcp(host: str, port: int, deadline: float) -> socket.socket:
    """Open a non-blocking TCP connection (first address that answers), StreamTimeout past deadline.

    OSError carries the reason (refused, unreachable) for the caller's 502 log line.
    """
    with trio.move_on_at(deadline):
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last_error: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await _connect(sock, address)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last_error
    raise StreamTimeout


async def _connect(sock: socket.socket, address: tuple[object, ...] | str) -> None:
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {address}: {errno.errorcode.get(err, err)}")
