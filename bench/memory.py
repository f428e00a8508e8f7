"""Memory: RSS per 1,000 idle TLS connections, and port443's RSS while 1 GB streams through.

Idle connections are opened by this process (blocking sockets, one request each so that every
connection is past its handshake and first exchange) against a freshly started target, before
any load has run on it: memory a load run freed would otherwise be reused and hide the cost.
The 1,000 HTTP/1.1 connections stay open while the 1,000 HTTP/2 ones are added, so each figure
is an increment on top of the previous reading.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from bench import procstat
from bench.procs import BenchError, pinned
from bench.targets import Target

MB = 1024 * 1024


def _client_context(alpn: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the bench's own throwaway certificate
    ctx.set_alpn_protocols([alpn])
    return ctx


def _connect(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    # Without it the request waits behind the handshake's last flight (Nagle + delayed ACK).
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def _h1_idle(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    sock = _connect(ctx, port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while b"hello\n" not in got:
        data = sock.recv(65536)
        if not data:
            raise BenchError(f"HTTP/1.1 connection closed before its response: {got[:200]!r}")
        got += data
    return sock


def _h2_idle(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    sock = _connect(ctx, port)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    headers = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/"),
    ]
    conn.send_headers(stream, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    done = False
    while not done:
        data = sock.recv(65536)
        if not data:
            raise BenchError("HTTP/2 connection closed before its response")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            done = done or (isinstance(event, h2.events.StreamEnded) and event.stream_id == stream)
        sock.sendall(conn.data_to_send())
    return sock


@dataclass
class IdleMemory:
    """RSS of a target's process tree with idle connections on top of a fresh start."""

    target: str
    count: int
    base_mb: float = 0.0
    h1_mb_per_1000: float | None = None
    h2_mb_per_1000: float | None = None
    conns_per_process: list[int] = field(default_factory=list)  # the h1 ones, by process
    note: str = ""


def _settled_rss(pid: int) -> float:
    time.sleep(1.0)  # let the target finish what the last connection started
    return procstat.tree_rss(pid) / MB


def idle_memory(target: Target, count: int) -> IdleMemory:
    """Open `count` idle h1 connections, then `count` idle h2 ones; RSS after each step."""
    pid, port = target.group.pid, target.port
    result = IdleMemory(target=target.label, count=count, base_mb=_settled_rss(pid))
    keep: list[ssl.SSLSocket] = []
    try:
        h1 = _client_context("http/1.1")
        for _ in range(count):
            keep.append(_h1_idle(h1, port))
        rss_h1 = _settled_rss(pid)
        result.h1_mb_per_1000 = (rss_h1 - result.base_mb) * 1000 / count
        tree = procstat.tree_of(procstat.proc_table(), pid)
        per_pid = procstat.connections_per_process(port, tree)
        result.conns_per_process = sorted((n for n in per_pid.values() if n), reverse=True)
        h2ctx = _client_context("h2")
        for _ in range(count):
            keep.append(_h2_idle(h2ctx, port))
        result.h2_mb_per_1000 = (_settled_rss(pid) - rss_h1) * 1000 / count
    except (OSError, BenchError) as exc:
        result.note = f"after {len(keep)} connections: {exc}"
    finally:
        for sock in keep:
            with contextlib.suppress(OSError):
                sock.close()
    return result


@dataclass
class StreamMemory:
    """port443's RSS while one large body streams through it."""

    direction: str  # "download" (upstream -> client) or "upload"
    size_mb: float
    seconds: float = 0.0
    base_mb: float = 0.0
    peak_mb: float = 0.0
    ok: bool = False
    note: str = ""

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.base_mb

    @property
    def mb_per_s(self) -> float:
        return self.size_mb / self.seconds if self.seconds else 0.0


def stream_memory(
    target: Target, *, direction: str, size: int, client_cpus: str, tmp: Path, timeout: float
) -> StreamMemory:
    """Stream `size` bytes through `target` (whose upstream is bench/sink.py) with curl."""
    port = target.port
    curl = ["curl", "-sk", "--http1.1", "--max-time", f"{timeout:g}", "-o", "/dev/null"]
    curl += [
        "--resolve",
        f"localhost:{port}:127.0.0.1",
        "-w",
        "%{http_code} %{size_download} %{size_upload}",
    ]
    if direction == "download":
        curl.append(f"https://localhost:{port}/bytes/{size}")
    else:
        body = tmp / "upload.bin"
        with body.open("wb") as f:
            f.truncate(size)  # sparse: zeros from the page cache, nothing written to disk
        curl += ["-T", str(body), f"https://localhost:{port}/upload"]
    result = StreamMemory(direction=direction, size_mb=size / MB)
    result.base_mb = result.peak_mb = procstat.tree_rss(target.group.pid) / MB
    t0 = time.monotonic()
    proc = subprocess.Popen(pinned(client_cpus, curl), stdout=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            result.peak_mb = max(result.peak_mb, procstat.tree_rss(target.group.pid) / MB)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0].split()
    result.seconds = time.monotonic() - t0
    moved = int(out[1] if direction == "download" else out[2]) if len(out) == 3 else 0
    result.ok = bool(out) and out[0] == "200" and moved == size
    if not result.ok:
        result.note = f"curl: status {out[0] if out else '-'}, {moved} of {size} bytes"
    return result
