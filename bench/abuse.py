"""Abusive clients against a real port443 process, and what a concurrent normal client sees.

    .venv/bin/python bench/abuse.py [--attackers 1000] [--idle 10500] [--max-connections 10000]
                                    [--waves 1]

For each attack: a normal client makes one request per new TLS connection in a loop (its p50,
p99 and failures before and during the attack), the proxy's CPU share during it, and its RSS
before, during and after (3 s after the attackers left). With `--waves N` the same attack then
comes back N-1 times and the RSS during and after each wave is printed: what one wave leaves
behind is reused by the next, or it grows. Loopback only; every loop is bounded
by a count and a time. The open-files limit is raised to its hard limit (the attackers' and
the proxy's descriptors). Attacks:
  slow-head      `attackers` TLS handshakes done, then a request head trickled a byte a second
  partial-hello  `attackers` times 60 bytes of a ClientHello, then nothing
  slowloris      both of the above at once (`attackers` of each)
  idle-at-limit  `idle` idle TCP connections against `max_connections`
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    root_ca: Path

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root_ca))
        context.set_alpn_protocols(["http/1.1"])
        return context


@contextlib.contextmanager
def running(work: Path, limits: str) -> Iterator[Proxy]:
    backend_port, https = free_port(), free_port()
    config = work / "port443.toml"
    config.write_text(
        f'log_level = "warning"\n[listen]\naddress = "127.0.0.1"\nhttp = 0\nhttps = {https}\n'
        f'[certs]\ndir = "{work / "certs"}"\n[admin]\nenabled = false\n'
        f"[access_log]\nenabled = false\n[limits]\n{limits}\n"
        f'[[sites]]\nhosts = ["localhost"]\nupstreams = ["http://127.0.0.1:{backend_port}"]\n'
    )
    log = (work / "proxy.log").open("wb")
    backend = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo", "--port", str(backend_port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)], cwd=ROOT, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", https)):
                break
            time.sleep(0.1)
        yield Proxy(proxy, https, work / "certs" / "local" / "root.pem")
    finally:
        for process in (proxy, backend):
            process.terminate()
            process.wait(15)
        log.close()


@dataclass
class Latencies:
    values: list[float] = field(default_factory=list)
    failures: int = 0

    def percentile(self, q: float) -> float | None:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    def summary(self) -> str:
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        if p50 is None or p99 is None:
            return f"no answers, {self.failures} failures"
        return (
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({len(self.values)} requests, {self.failures} failures)"
        )


def probe(proxy: Proxy, seconds: float) -> Latencies:
    """A normal client: a new TLS connection and one request at a time, for `seconds`."""
    out = Latencies()
    context = proxy.context()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(REQUEST)
                if not tls.recv(65536).startswith(b"HTTP/1.1 200"):
                    raise OSError("not a 200")
            out.values.append(time.monotonic() - start)
        except OSError:
            out.failures += 1
        time.sleep(0.02)
    return out


def client_hello() -> bytes:
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing, server_hostname="localhost"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass
class Signals:
    """Between an attack's thread and `measure`: all attackers connected; the attack is over."""

    ready: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


Attack = Callable[[Proxy, int, Signals], None]


def _hold(socks: list[socket.socket], signals: Signals, tick: Callable[[], None]) -> None:
    signals.ready.set()
    try:
        while not signals.stop.wait(1.0):
            tick()
    finally:
        for sock in socks:
            sock.close()


def slow_head(proxy: Proxy, count: int, signals: Signals) -> None:
    context = proxy.context()
    socks: list[socket.socket] = []
    for _ in range(count):
        if signals.stop.is_set():
            break
        with contextlib.suppress(OSError):
            tls = context.wrap_socket(
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5),
                server_hostname="localhost",
            )
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            tls.setblocking(False)
            socks.append(tls)

    def trickle() -> None:
        for sock in socks:
            with contextlib.suppress(OSError, ssl.SSLError):
                sock.send(b"x")

    _hold(socks, signals, trickle)


def partial_hello(proxy: Proxy, count: int, signals: Signals) -> None:
    head = client_hello()[:60]
    socks = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(head)
            socks.append(sock)
    _hold(socks, signals, lambda: None)


def slowloris(proxy: Proxy, count: int, signals: Signals) -> None:
    """Slow heads and stalled handshakes together, `count` of each."""
    parts = [Signals(stop=signals.stop) for _ in range(2)]
    threads = [
        threading.Thread(target=attack, args=(proxy, count, part))
        for attack, part in zip((slow_head, partial_hello), parts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for part in parts:
        while not (part.ready.wait(0.5) or signals.stop.is_set()):
            pass
    signals.ready.set()
    for thread in threads:
        thread.join()


def idle(proxy: Proxy, count: int, signals: Signals) -> None:
    socks = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
    _hold(socks, signals, lambda: None)


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one (the proxy inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Wave:
    """One wave of an attack: how long the attackers took to connect, and what was measured
    while they were on (a probe of the normal client, the proxy's CPU share and RSS)."""

    connected: float = 0.0
    during: Latencies | None = None
    cpu_share: float = 0.0
    rss_during: float = 0.0
    rss_after: float = 0.0


def attack_wave(proxy: Proxy, attack: Attack, count: int, window: float) -> Wave:
    """Connect the attackers, measure for `window` s (no probe when 0), let them go; the RSS
    3 s after they left."""
    pid = proxy.process.pid
    result = Wave()
    signals = Signals()
    attacker = threading.Thread(target=attack, args=(proxy, count, signals))
    attacker.start()
    connecting = time.monotonic()
    signals.ready.wait(120)  # every attacker connected (bounded)
    result.connected = time.monotonic() - connecting
    time.sleep(1.0)
    if window:
        cpu, wall = cpu_seconds(pid), time.monotonic()
        result.during = probe(proxy, window)
        result.cpu_share = (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
    result.rss_during = rss_mib(pid)
    signals.stop.set()
    attacker.join()
    time.sleep(3.0)
    result.rss_after = rss_mib(pid)
    return result


def measure(name: str, attack: Attack, limits: str, count: int, window: float, waves: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="port443-abuse-") as tmp,
        running(Path(tmp), limits) as proxy,
    ):
        probe(proxy, 1.0)  # warm-up: certificate, pools
        before = probe(proxy, window)
        rss_before = rss_mib(proxy.process.pid)
        first = attack_wave(proxy, attack, count, window)
        assert first.during is not None
        print(
            f"{name} ({count} attackers, connected in {first.connected:.1f} s; "
            f"{limits.strip() or 'default limits'}):"
        )
        print(f"  normal client before: {before.summary()}")
        print(f"  normal client during: {first.during.summary()}")
        print(
            f"  proxy CPU during: {first.cpu_share * 100:.0f}%; RSS before {rss_before:.0f} MiB, "
            f"during {first.rss_during:.0f} MiB, after {first.rss_after:.0f} MiB",
            flush=True,
        )
        for number in range(2, waves + 1):
            again = attack_wave(proxy, attack, count, 0)
            print(
                f"  wave {number}: RSS during {again.rss_during:.0f} MiB, "
                f"after {again.rss_after:.0f} MiB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=1000, help="slow and stalled clients")
    parser.add_argument("--idle", type=int, default=10500, help="idle-at-limit's connections")
    parser.add_argument("--max-connections", type=int, default=10000)
    parser.add_argument("--window", type=float, default=6.0, help="seconds per probe phase")
    parser.add_argument("--waves", type=int, default=1, help="attacks in a row on one proxy")
    parser.add_argument(
        "--only", choices=("slow-head", "partial-hello", "slowloris", "idle-at-limit")
    )
    args = parser.parse_args()
    print(f"open files limit: {raise_open_files_limit()}")
    attacks: list[tuple[str, Attack, str, int]] = [
        ("slow-head", slow_head, "", args.attackers),
        ("partial-hello", partial_hello, "", args.attackers),
        ("slowloris", slowloris, "", args.attackers),
        ("idle-at-limit", idle, f"max_connections = {args.max_connections}\n", args.idle),
    ]
    for name, attack, limits, count in attacks:
        if args.only in (None, name):
            measure(name, attack, limits, count, args.window, args.waves)


if __name__ == "__main__":
    main()
