"""Abusive clients against a real port443 process, and what a concurrent normal client sees.

    .venv/bin/python bench/abuse.py [--only NAME[,NAME]] [--attackers 1000] [--idle 10500]
                                    [--max-connections 10000] [--waves 1]

For each attack: a normal client (127.0.0.1) makes one request per new TLS connection in a
loop (its p50, p99 and failures before and during the attack), the proxy's CPU share during
it, its RSS before, during and after (11 s after the attackers left: the proxy
looks at its heap every 5 s), and what the attackers
(127.0.0.2, bench/attacks.py) got. With `--waves N` the same attack then comes back N-1 times
and the RSS during and after each wave is printed: what one wave leaves behind is reused by
the next, or it grows. Loopback only; every loop is bounded by a count and a time. The
open-files limit is raised to its hard limit (the attackers' and the proxy's descriptors).
The backend is bench/sink.py. A markdown table of every attack run ends the output.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import attacks, procstat
from bench.attacks import Attack, Signals, Target
from bench.targets import free_port

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def cpu_seconds(pid: int) -> float:
    return procstat.seconds(sum(procstat.tree_ticks(pid).values()))


def rss_mib(pid: int) -> float:
    return procstat.tree_rss(pid) / (1 << 20)


@dataclass(frozen=True)
class Spec:
    """One attack as run here: the attacker, how many, and the proxy it meets."""

    name: str
    attack: Attack
    count: int
    what: str  # for the table: the attack in words
    config: str = ""  # TOML added to the proxy's configuration
    window: float | None = None  # seconds of each probe phase, when not --window
    open_files: int | None = None  # the proxy's RLIMIT_NOFILE, when not the hard limit


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    target: Target


@contextlib.contextmanager
def running(work: Path, spec: Spec) -> Iterator[Proxy]:
    backend_port, https = free_port(), free_port()
    config = work / "port443.toml"
    config.write_text(
        f'log_level = "warning"\n[listen]\naddress = "127.0.0.1"\nhttp = 0\nhttps = {https}\n'
        f'[certs]\ndir = "{work / "certs"}"\n[admin]\nenabled = false\n'
        f"[access_log]\nenabled = false\n{spec.config}\n"
        f'[[sites]]\nhosts = ["localhost"]\nupstreams = ["http://127.0.0.1:{backend_port}"]\n'
    )
    log = (work / "proxy.log").open("wb")
    backend = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "sink.py"), str(backend_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def limit_open_files() -> None:
        if spec.open_files:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (spec.open_files, hard))

    proxy = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        preexec_fn=limit_open_files,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", https)):
                break
            time.sleep(0.1)
        yield Proxy(proxy, Target(https, work / "certs" / "local" / "root.pem"))
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

    def brief(self) -> str:
        """p50 / p99 and failures, for the table."""
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        if p50 is None or p99 is None:
            return f"no answers, {self.failures} failures"
        total = len(self.values) + self.failures
        return f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms, {self.failures} of {total} failed"


def probe(target: Target, seconds: float) -> Latencies:
    """A normal client: a new TLS connection and one request at a time, for `seconds`."""
    out = Latencies()
    context = target.context()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            raw = socket.create_connection(("127.0.0.1", target.port), timeout=5)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(REQUEST)
                if not tls.recv(65536).startswith(b"HTTP/1.1 200"):
                    raise OSError("not a 200")
            out.values.append(time.monotonic() - start)
        except OSError:
            out.failures += 1
        time.sleep(0.02)
    return out


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one (the proxy inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Wave:
    """One wave of an attack: how long the attackers took to be at full strength, what was
    measured while they were (the normal client, the proxy's CPU share and RSS), and what
    they got."""

    connected: float = 0.0
    during: Latencies | None = None
    cpu_share: float = 0.0
    rss_during: float = 0.0
    rss_after: float = 0.0
    got: dict[str, int] = field(default_factory=dict)


def _attack(
    spec: Spec, target: Target, ready: Event, stop: Event, got: Queue[Counter[str]]
) -> None:
    """The attackers' process: their threads never hold the normal client's GIL."""
    signals = Signals()
    attacker = threading.Thread(target=spec.attack, args=(target, spec.count, signals))
    attacker.start()
    if signals.ready.wait(120):  # every attacker connected (bounded)
        ready.set()
    stop.wait(600)
    signals.stop.set()
    attacker.join()
    got.put(signals.got)


def attack_wave(proxy: Proxy, spec: Spec, window: float) -> Wave:
    """Bring the attackers, measure for `window` s (no probe when 0), let them go; the RSS
    11 s after they left (two of the proxy's looks at its heap)."""
    pid = proxy.process.pid
    result = Wave()
    forked = multiprocessing.get_context("fork")  # the attack (closures) is inherited
    ready, stop, got = forked.Event(), forked.Event(), forked.Queue()
    attackers = forked.Process(target=_attack, args=(spec, proxy.target, ready, stop, got))
    connecting = time.monotonic()
    attackers.start()
    ready.wait(120)
    result.connected = time.monotonic() - connecting
    time.sleep(1.0)
    if window:
        cpu, wall = cpu_seconds(pid), time.monotonic()
        result.during = probe(proxy.target, window)
        result.cpu_share = (cpu_seconds(pid) - cpu) / (time.monotonic() - wall)
    result.rss_during = rss_mib(pid)
    stop.set()
    result.got = dict(got.get(timeout=120).most_common())
    attackers.join(30)
    time.sleep(11.0)
    result.rss_after = rss_mib(pid)
    return result


def measure(spec: Spec, window: float, waves: int) -> str:
    """Runs one attack; prints what was seen, returns its row of the table."""
    window = spec.window or window
    with (
        tempfile.TemporaryDirectory(prefix="port443-abuse-") as tmp,
        running(Path(tmp), spec) as proxy,
    ):
        probe(proxy.target, 1.0)  # warm-up: certificate, pools
        before = probe(proxy.target, window)
        rss_before = rss_mib(proxy.process.pid)
        first = attack_wave(proxy, spec, window)
        assert first.during is not None
        got = ", ".join(f"{what}: {n:,}" for what, n in first.got.items())
        rss = f"{rss_before:.0f} / {first.rss_during:.0f} / {first.rss_after:.0f} MiB"
        print(f"{spec.name} ({spec.what}; at full strength in {first.connected:.1f} s):")
        print(f"  normal client before: {before.brief()}")
        print(f"  normal client during: {first.during.brief()}")
        print(f"  proxy CPU during: {first.cpu_share * 100:.0f}%; RSS before/during/after {rss}")
        print(f"  the attackers got: {got}", flush=True)
        for number in range(2, waves + 1):
            again = attack_wave(proxy, spec, 0)
            rss += f"; wave {number}: {again.rss_during:.0f} / {again.rss_after:.0f}"
            print(
                f"  wave {number}: RSS during {again.rss_during:.0f} MiB, "
                f"after {again.rss_after:.0f} MiB",
                flush=True,
            )
        return (
            f"| {spec.name}: {spec.what} | {got} | {before.brief()} | {first.during.brief()} "
            f"| {first.cpu_share * 100:.0f}% | {rss} |"
        )


def flood(name: str, burst: attacks.Burst, unit: str, what: str) -> Spec:
    """An HTTP/2 flood from 4 connections at a time, a new one as the proxy ends each."""
    return Spec(name, attacks.flood(burst, unit), 4, f"HTTP/2 {what}, 4 connections at a time")


def specs(args: argparse.Namespace) -> list[Spec]:
    n = args.attackers
    return [
        Spec(
            "slow-head",
            attacks.slow_head,
            n,
            f"{n:,} TLS clients trickling a request head, a byte a second",
        ),
        Spec(
            "partial-hello",
            attacks.partial_hello,
            n,
            f"{n:,} connections with 60 bytes of a ClientHello, then silent",
        ),
        Spec(
            "slowloris", attacks.slowloris, n, f"slow-head and partial-hello at once, {n:,} of each"
        ),
        Spec(
            "idle-at-limit",
            attacks.idle,
            args.idle,
            f"{args.idle:,} idle TCP connections, `max_connections = {args.max_connections}`",
            f"[limits]\nmax_connections = {args.max_connections}\n",
        ),
        Spec(
            "connections-per-ip",
            attacks.idle,
            n,
            f"{n:,} idle TCP connections from one address, `max_connections_per_ip = 100`",
            "[limits]\nmax_connections_per_ip = 100\n",
        ),
        Spec(
            "request-rate",
            attacks.in_threads(attacks.request_flood),
            4,
            "4 keep-alive connections sending requests back to back, "
            "`requests_per_second_per_ip = 100`",
            "[limits]\nrequests_per_second_per_ip = 100\n",
        ),
        Spec(
            "open-files",
            attacks.idle,
            2000,
            "2,000 idle TCP connections against a proxy allowed 1,024 open files",
            open_files=1024,
        ),
        flood(
            "rapid-reset",
            attacks.rapid_reset,
            "HEADERS + RST_STREAM sent",
            "rapid reset: requests each cancelled at once",
        ),
        flood(
            "made-you-reset",
            attacks.made_you_reset,
            "malformed requests sent",
            "MadeYouReset: requests the proxy must reset",
        ),
        flood(
            "control-frames",
            attacks.control_frames,
            "PING and SETTINGS sent",
            "PING and SETTINGS floods, acknowledgements never read",
        ),
        flood(
            "continuation",
            attacks.continuation,
            "CONTINUATION frames sent",
            "header block without end, 16 KiB CONTINUATION frames",
        ),
        flood(
            "hpack-bomb",
            attacks.hpack_bomb,
            "bomb requests sent",
            "6 KB header blocks that decode to 8 MB",
        ),
        Spec(
            "zero-window",
            attacks.in_threads(attacks.zero_window),
            5,
            "HTTP/2 5 connections x 100 streams for 1 MB each, window 0 never opened",
            window=12.0,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=1000, help="slow and stalled clients")
    parser.add_argument("--idle", type=int, default=10500, help="idle-at-limit's connections")
    parser.add_argument("--max-connections", type=int, default=10000)
    parser.add_argument("--window", type=float, default=6.0, help="seconds per probe phase")
    parser.add_argument("--waves", type=int, default=1, help="attacks in a row on one proxy")
    parser.add_argument("--only", help="attacks to run, by name, comma-separated")
    args = parser.parse_args()
    chosen = specs(args)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {spec.name for spec in chosen}
        if unknown:
            parser.error(f"no attack named {', '.join(sorted(unknown))}")
        chosen = [spec for spec in chosen if spec.name in names]
    print(f"open files limit: {raise_open_files_limit()}")
    rows = [measure(spec, args.window, args.waves) for spec in chosen]
    print(
        "\n| attack | the attackers got | normal client before: p50 / p99 | during "
        "| proxy CPU during | RSS before / during / after |\n|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
