"""Loopback ports and the kernel's view of sockets (/proc): which port is free, which process
listens on a port or accepted a connection."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

_LISTEN = "0A"  # the TCP state in /proc/net/tcp


def free_port() -> int:
    """A loopback TCP port nobody is bound to right now."""
    return free_ports(1)[0]


def free_ports(count: int, *, besides: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct loopback TCP ports nobody is bound to right now, none of `besides`:
    all held at once while chosen, so two calls' worth cannot come back the same."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in besides:
                ports.append(port)
        return ports


def free_dns_port(*, besides: tuple[int, ...] = ()) -> int:
    """A loopback port free for both TCP and UDP right now, as a DNS server needs; none of
    `besides` (ports chosen for its neighbours, not bound yet)."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            if port in besides:
                continue
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_table() -> list[list[str]]:
    """Rows of /proc/net/tcp: local address, remote address, state, ..., inode (field 9)."""
    return [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a socket listening on 127.0.0.1:`port` (with
    SO_REUSEPORT several processes may, so a successful connect proves less)."""
    listening = {row[9] for row in _tcp_table() if row[1] == _loopback(port) and row[3] == _LISTEN}
    return bool(listening) and not listening.isdisjoint(socket_inodes(pid))


def accepted_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback connection from `client_port`."""
    wanted = (_loopback(server_port), _loopback(client_port))
    for row in _tcp_table():
        if (row[1], row[2]) == wanted:
            return row[9]
    return None
