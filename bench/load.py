"""The load runs: h2load against one target, with /proc accounting around each run.

The HTTP/3 row (and its HTTP/2 reference) use bench/pyclient.py instead: h2load 1.52 in Debian
has no HTTP/3, and the Python client takes h2load's options and prints its summary lines.

A measured run is one h2load invocation pinned to the client core(s). Around it the bench reads
the CPU ticks of the target's whole process tree, of the backend's, of h2load itself (rusage
of the reaped child) and of the whole machine, so that every row says the CPU the proxy spent
per request (per connection in the handshake cases), whether the load generator's core was
saturated (then req/s is a lower bound for that target), and how busy the rest of the machine
was. Latency percentiles come from h2load's --log-file.

h2load quirks (nghttp2 1.52), from the team's reference harness: its -D (timed) mode hangs with
"Connection: close", so the handshake cases use -n sized by a short calibration run; and with
"Connection: close" it keeps its SSL object and so resumes every session; templates/h2load-shim.c
(LD_PRELOAD) makes it start a fresh one per connection for the full-handshake case.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat
from bench.procs import BenchError, log, pinned

PYCLIENT = Path(__file__).resolve().parent / "pyclient.py"
HANDSHAKE_CAP = 25000  # connections per handshake run: ephemeral ports and TIME_WAIT stay sane


@dataclass(frozen=True)
class Case:
    """One load shape."""

    name: str  # "h1", "tls-full", "h2-100k", "h1@50" (sweep)
    title: str
    h1: bool
    clients: int
    streams: int = 1  # concurrent streams per h2 connection
    path: str = "/"
    handshake: str | None = None  # "full" or "resume": one request per connection
    pyclient: str | None = None  # "h2" or "h3": bench/pyclient.py with that ALPN, not h2load

    @property
    def alpn(self) -> str:
        return self.pyclient or ("http/1.1" if self.h1 else "h2")

    @property
    def concurrency(self) -> int:
        return self.clients * self.streams


CASES = (
    Case(name="h1", title="HTTP/1.1 keep-alive over TLS", h1=True, clients=50),
    Case(name="h2", title="HTTP/2 (-c 50 -m 10)", h1=False, clients=50, streams=10),
    Case(
        name="tls-full",
        title="full TLS 1.3 handshake + 1 request",
        h1=True,
        clients=50,
        handshake="full",
    ),
    Case(
        name="tls-resume",
        title="resumed TLS 1.3 + 1 request",
        h1=True,
        clients=50,
        handshake="resume",
    ),
    Case(name="h1-100k", title="HTTP/1.1, 100 KB body", h1=True, clients=50, path="/100k"),
    Case(
        name="h2-100k",
        title="HTTP/2, 100 KB body",
        h1=False,
        clients=50,
        streams=10,
        path="/100k",
    ),
    # port443 only: h2load cannot speak HTTP/3; the same Python client drives both rows.
    Case(
        name="py-h2",
        title="HTTP/2, Python client (-c 10 -m 10)",
        h1=False,
        clients=10,
        streams=10,
        pyclient="h2",
    ),
    Case(
        name="py-h3",
        title="HTTP/3, Python client (-c 10 -m 10)",
        h1=False,
        clients=10,
        streams=10,
        pyclient="h3",
    ),
    Case(
        name="py-h2-100k",
        title="HTTP/2, Python client, 100 KB body",
        h1=False,
        clients=10,
        streams=10,
        path="/100k",
        pyclient="h2",
    ),
    Case(
        name="py-h3-100k",
        title="HTTP/3, Python client, 100 KB body",
        h1=False,
        clients=10,
        streams=10,
        path="/100k",
        pyclient="h3",
    ),
)


def sweep_case(proto: str, concurrency: int) -> Case:
    """`concurrency` requests in flight: h1 = that many connections; h2 = up to 10 streams each."""
    if proto == "h1":
        return Case(name=f"h1@{concurrency}", title="", h1=True, clients=concurrency)
    clients = math.ceil(concurrency / 10)
    return Case(
        name=f"h2@{concurrency}",
        title="",
        h1=False,
        clients=clients,
        streams=max(1, concurrency // clients),
    )


@dataclass(frozen=True)
class H2loadSummary:
    """What h2load's text output says about a run."""

    rps: float = 0.0
    succeeded: int = 0
    failed: int = 0  # failed + errored + timeout + non-2xx status
    tls: str = "-"
    alpn: str = "-"


def parse_h2load(text: str) -> H2loadSummary:
    rps = re.search(r"finished in \S+, ([\d.]+) req/s", text)
    reqs = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    tls = re.search(r"TLS Protocol: (\S+)", text)
    alpn = re.search(r"Application protocol: (\S+)", text)
    bad = sum(map(int, reqs.groups()[1:])) if reqs else 0
    bad += sum(map(int, codes.groups())) if codes else 0
    return H2loadSummary(
        rps=float(rps.group(1)) if rps else 0.0,
        succeeded=int(reqs.group(1)) if reqs else 0,
        failed=bad,
        tls=tls.group(1) if tls else "-",
        alpn=alpn.group(1) if alpn else "-",
    )


def parse_log_latencies(text: str) -> list[float]:
    """Request times in ms, sorted, from h2load --log-file lines (start, status, duration us)."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].lstrip("-").isdigit() and int(parts[1]) > 0:
            out.append(int(parts[2]) / 1000.0)
    out.sort()
    return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values) - 1, max(0, rank - 1))]


def cpu_list(cpus: str) -> list[int]:
    """The CPUs a taskset list like "0", "1,3" or "4-7" names."""
    out: list[int] = []
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


@dataclass
class Measurement:
    """One measured run of one case against one target."""

    target: str
    case: str
    concurrency: int
    requests: int = 0  # succeeded (connections, in the handshake cases)
    failed: int = 0
    rps: float = 0.0
    wall_s: float = 0.0
    cpu_us: float | None = None  # proxy tree CPU per request / per connection
    p50_ms: float | None = None
    p99_ms: float | None = None
    proxy_pct: float = 0.0  # % of one core, over the run's wall time
    h2load_pct: float = 0.0
    backend_pct: float = 0.0
    other_pct: float = 0.0  # the rest of the machine (other users of these 2 cores)
    client_cores: int = 1
    client_busy_pct: float = 0.0  # the client CPUs, whoever used them (/proc/stat)
    cpu_split: list[float] = field(default_factory=list)  # shares of the proxy tree's processes
    tls: str = "-"
    alpn: str = "-"
    note: str = ""

    @property
    def generator_bound(self) -> bool:
        """The load generator's side was the limit: h2load's core (nearly) full, whether by
        h2load, the backend or other processes, while the proxy's was not; req/s is then a
        lower bound for the target."""
        client_full = self.h2load_pct >= 90 or self.client_busy_pct >= 90 * self.client_cores
        return client_full and self.proxy_pct < 90


@dataclass(frozen=True)
class LoadGenerator:
    """h2load pinned to the client CPUs, with the shim for full handshakes when it built."""

    h2load: str
    client_cpus: str
    work: Path
    shim: Path | None

    @classmethod
    def prepare(cls, work: Path, client_cpus: str) -> LoadGenerator:
        h2load = shutil.which("h2load")
        if h2load is None:
            raise BenchError("h2load not found (Debian: apt-get install nghttp2-client)")
        return cls(h2load=h2load, client_cpus=client_cpus, work=work, shim=_build_shim(work))

    def argv(self, case: Case, port: int, sizing: list[str], log_file: Path | None) -> list[str]:
        client = [sys.executable, str(PYCLIENT)] if case.pyclient else [self.h2load]
        argv = [*client, "-t", "1", *sizing, "-c", str(case.clients)]
        argv += ["--h1"] if case.h1 else ["-m", str(case.streams)]
        if case.pyclient:
            argv.append(f"--npn-list={case.pyclient}")
        if case.handshake:
            argv += ["-H", "Connection: close"]
        if log_file is not None:
            argv.append(f"--log-file={log_file}")
        # SNI and :authority say localhost; the TCP connection goes to 127.0.0.1.
        argv += [f"--connect-to=127.0.0.1:{port}", f"https://localhost:{port}{case.path}"]
        return pinned(self.client_cpus, argv)

    def env(self, case: Case) -> dict[str, str] | None:
        if case.handshake != "full":
            return None
        if self.shim is None:
            raise BenchError("the h2load shim did not build (gcc missing?): no full handshakes")
        return dict(os.environ, LD_PRELOAD=str(self.shim), PEERBENCH_NORESUME="1")

    def _h2load(self, argv: list[str], env: dict[str, str] | None, timeout: float) -> str:
        try:
            out = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"h2load ran over {timeout:.0f}s: {' '.join(argv)}") from exc
        return out.stdout + out.stderr

    def warm_up(self, case: Case, port: int, seconds: float) -> None:
        sizing = ["-n", str(case.clients * 4)] if case.handshake else ["-D", f"{seconds:g}"]
        self._h2load(self.argv(case, port, sizing, None), self.env(case), seconds + 60)

    def _sizing(self, case: Case, port: int, seconds: float) -> list[str]:
        """-n for about `seconds` of handshakes (h2load's -D hangs with Connection: close)."""
        n0 = case.clients * 4
        text = self._h2load(self.argv(case, port, ["-n", str(n0)], None), self.env(case), 60)
        rate = parse_h2load(text).rps
        return ["-n", str(int(min(HANDSHAKE_CAP, max(n0, rate * seconds))))]

    def measure(
        self,
        case: Case,
        *,
        target: str,
        port: int,
        proxy_pid: int,
        backend_pid: int,
        seconds: float,
    ) -> Measurement:
        """One accounted run of about `seconds`."""
        sizing = self._sizing(case, port, seconds) if case.handshake else ["-D", f"{seconds:g}"]
        log_file = self.work / "tmp" / f"{target}-{case.name}.tsv"
        argv = self.argv(case, port, sizing, log_file)
        proxy0, backend0 = procstat.tree_ticks(proxy_pid), procstat.tree_ticks(backend_pid)
        cpus = cpu_list(self.client_cpus)
        client0, busy0, child0, t0 = (
            procstat.busy_ticks(cpus),
            procstat.busy_ticks(),
            resource.getrusage(resource.RUSAGE_CHILDREN),
            time.monotonic(),
        )
        text = self._h2load(argv, self.env(case), seconds + 90)
        wall = time.monotonic() - t0
        client1, busy1 = procstat.busy_ticks(cpus), procstat.busy_ticks()
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proxy = procstat.ticks_delta(proxy0, procstat.tree_ticks(proxy_pid))
        backend = sum(procstat.ticks_delta(backend0, procstat.tree_ticks(backend_pid)).values())
        summary = parse_h2load(text)
        latencies = parse_log_latencies(log_file.read_text()) if log_file.exists() else []
        log_file.unlink(missing_ok=True)

        proxy_s = procstat.seconds(sum(proxy.values()))
        h2load_s = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        machine_s = procstat.seconds(busy1 - busy0)
        m = Measurement(
            target=target,
            case=case.name,
            concurrency=case.concurrency,
            requests=summary.succeeded,
            failed=summary.failed,
            rps=summary.rps,
            wall_s=wall,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            proxy_pct=100 * proxy_s / wall,
            h2load_pct=100 * h2load_s / wall,
            backend_pct=100 * procstat.seconds(backend) / wall,
            other_pct=max(
                0.0, 100 * (machine_s - proxy_s - h2load_s - procstat.seconds(backend)) / wall
            ),
            client_cores=len(cpus),
            client_busy_pct=100 * procstat.seconds(client1 - client0) / wall,
            tls=summary.tls,
            alpn=summary.alpn,
        )
        if summary.succeeded:
            m.cpu_us = proxy_s * 1e6 / summary.succeeded
        total = sum(proxy.values())
        if total:
            m.cpu_split = sorted(
                (t / total for t in proxy.values() if t / total >= 0.02), reverse=True
            )
        if summary.alpn not in ("-", case.alpn):
            m.note = f"negotiated {summary.alpn}, not {case.alpn}"
        elif summary.succeeded == 0:
            lines = [ln for ln in text.splitlines() if ln.strip() and "progress" not in ln]
            m.note = "no request succeeded: " + " | ".join(lines[-3:])[:200]
        elif summary.failed:
            m.note = f"{summary.failed} failed"
        return m


def _build_shim(work: Path) -> Path | None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    out = work / "h2load-shim.so"
    src = Path(__file__).resolve().parent / "templates" / "h2load-shim.c"
    if gcc is None:
        log("no C compiler: the full-handshake case will be skipped")
        return None
    built = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        log(f"building the h2load shim failed: {built.stderr.strip()[:300]}")
        return None
    return out
