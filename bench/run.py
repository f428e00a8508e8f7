#!/usr/bin/env python3
"""Benchmark port443 against nginx as a TLS reverse proxy, on loopback, in one command.

    .venv/bin/python bench/run.py [--requests N] [--only h1|h2]

One run starts, each in its own temporary directory and process group:
  * a backend nginx (1 worker) answering "/" with a fixed "hello\\n" and "/16k" with a 16 KiB file;
  * nginx as a TLS reverse proxy (1 worker, Mozilla intermediate TLS, keep-alive upstream) in
    front of that backend, with a certificate from a throwaway CA minted here;
  * port443 (`python -m proxy run`) in front of the same backend, with its built-in local CA.
Then h2load drives each target (warm-up first) and the CPU time the server's process tree spent
(utime+stime from /proc, master and workers summed) is read before and after every run. The
table shows req/s, latency, CPU microseconds per request and requests per CPU-second, and the
ratios port443/nginx; the same numbers go to bench/results/<timestamp>.json.

Profiling port443 (see bench/README.md): `--py-spy` samples it during an extra, unmeasured run
per protocol; the environment variable BENCH_CPROFILE=<file.prof> runs it under cProfile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from proxy.tls.policy import TLS12_CIPHERS  # nginx gets port443's own TLS 1.2 policy

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"

SMALL_BODY = b"hello\n"
BIG_BODY = (b"port443 bench payload, 64 bytes per line, repeated to 16 KiB..\n" * 256)[:16384]
PATHS = {"small": ("/", SMALL_BODY), "16k": ("/16k", BIG_BODY)}

CADDY_REFERENCE = {"h1": 68.0, "h2": 128.0}  # µs of CPU per request over TLS, not run here

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure that ends the run with a clear message instead of a traceback."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@dataclass
class Managed:
    """A server process started in its own session (so its whole group can be signalled)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """Signal the process group, wait up to `grace` seconds, then SIGKILL the group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace:.0f}s, killing it")
        # Whatever is left of the group (workers of a dead master, for instance) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def start_process(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    stop_signal: int = signal.SIGTERM,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Managed:
    logf = log_path.open("wb")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    finally:
        logf.close()
    return Managed(name, popen, log_path, stop_signal)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, user ticks, system ticks) for every visible process.

    User is utime + cutime, system is stime + cstime (fields 14..17 of /proc/<pid>/stat): the
    time of reaped children shows up in their parent, so a tree's sum stays continuous if a
    worker is replaced between two readings.
    """
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (raw := _read(f"/proc/{entry}/stat")) is None:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()  # rest[i] is field i + 3
        user = int(rest[11]) + int(rest[13])
        system = int(rest[12]) + int(rest[14])
        table[int(entry)] = (int(rest[1]), user, system)
    return table


def _sched_seconds(pid: int) -> float | None:
    """On-CPU time of the live threads of `pid` from schedstat (ns resolution), or None."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        raw = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if raw is None:
            return None
        total += int(raw.split()[0])
    return total / 1e9


@dataclass
class CPUSample:
    user_s: float  # whole tree, from /proc/<pid>/stat, 1/CLK_TCK resolution
    sys_s: float
    sched_s: float | None  # live threads' schedstat run time, whole tree, ns resolution
    pids: int


def tree_cpu(root: int) -> CPUSample:
    """CPU time used so far by `root` and all its descendants (nginx master + workers)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    user = system = count = 0
    sched: float | None = 0.0
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            user += table[pid][1]
            system += table[pid][2]
            count += 1
            s = _sched_seconds(pid)
            sched = None if s is None or sched is None else sched + s
        stack.extend(children.get(pid, ()))
    return CPUSample(user / CLK_TCK, system / CLK_TCK, sched, count)


@dataclass
class CPUDelta:
    seconds: float
    source: str  # "schedstat" or "stat"
    sys_fraction: float | None  # share of kernel time, from the tick counts


def cpu_delta(before: CPUSample, after: CPUSample) -> CPUDelta:
    """CPU seconds between two samples.

    /proc/<pid>/stat counts in clock ticks (10 ms), coarse for nginx's few hundred ms per
    run; schedstat has the same total in ns. It is used unless it disagrees with the tick count
    by more than the ticks' rounding (a thread that exited mid-run, say).
    """
    user = after.user_s - before.user_s
    system = after.sys_s - before.sys_s
    ticks = user + system
    sys_fraction = system / ticks if ticks > 0 else None
    if before.sched_s is not None and after.sched_s is not None:
        sched = after.sched_s - before.sched_s
        tolerance = 4 * max(before.pids, after.pids) / CLK_TCK + 0.05 * ticks
        if abs(sched - ticks) <= tolerance:
            return CPUDelta(sched, "schedstat", sys_fraction)
    return CPUDelta(ticks, "stat", sys_fraction)


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- certificates


def mint_ca_and_leaf(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway root CA and an ECDSA P-256 leaf for localhost/127.0.0.1: (ca, chain, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "port443 bench throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, chain_path, key_path = (
        directory / "ca.pem",
        directory / "fullchain.pem",
        directory / "privkey.pem",
    )
    ca_path.write_bytes(ca_cert.public_bytes(pem))
    chain_path.write_bytes(leaf_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_path.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, chain_path, key_path


# --------------------------------------------------------------------------- nginx


def _nginx_user_line() -> str:
    # As root the workers would drop to "nobody", which cannot read our 0700 temp dir:
    # keep them as the current user. As non-root nginx ignores (and warns about) "user".
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    pw = pwd.getpwuid(os.geteuid())
    return f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};\n"


def _nginx_main(prefix: Path, http_body: str) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'temp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{_nginx_user_line()}worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{temp}
{http_body}
}}
"""


def backend_conf(prefix: Path, port: int) -> str:
    return _nginx_main(
        prefix,
        f"""    sendfile on;
    tcp_nopush on;
    open_file_cache max=16;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix / "html"};
        location = / {{ return 200 "hello\\n"; }}
        location = /16k {{ }}
    }}""",
    )


def tls_proxy_conf(prefix: Path, port: int, backend_port: int, chain: Path, key: Path) -> str:
    # Mozilla "intermediate" (nginx 1.22, OpenSSL 3); the headers mirror what port443 adds.
    return _nginx_main(
        prefix,
        f"""    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        server_name localhost;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_session_timeout 1d;
        ssl_session_cache shared:MozSSL:10m;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            add_header Strict-Transport-Security "max-age=63072000; includeSubDomains" always;
        }}
    }}""",
    )


def start_nginx(nginx: str, name: str, prefix: Path, conf_text: str) -> Managed:
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    base = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
    test = subprocess.run(
        [*base, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
    )
    if test.returncode != 0:
        raise BenchError(f"nginx rejected the {name} config {conf}:\n{test.stderr.strip()}")
    # SIGTERM = nginx's fast shutdown; the master stops its workers.
    return start_process(name, base, prefix / "stdout.log", stop_signal=signal.SIGTERM)


# --------------------------------------------------------------------------- probes


@dataclass
class TLSInfo:
    alpn: str | None
    version: str | None
    cipher: str | None
    cert_key: str | None


def _client_context(cafile: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def _key_description(der: bytes | None) -> str | None:
    if not der:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = x509.load_der_x509_certificate(der).public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def _decode_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise BenchError(f"incomplete HTTP response: {raw[:200]!r}")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    if headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
        out, rest = bytearray(), body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        body = bytes(out)
    return status, body


def http_get(
    port: int,
    path: str,
    *,
    tls_ca: Path | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes, TLSInfo | None]:
    """One HTTP/1.1 GET with Connection: close; TLS (verified against tls_ca) if given."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        sock: socket.socket = raw
        info = None
        if tls_ca is not None:
            sock = _client_context(tls_ca, ["http/1.1"]).wrap_socket(
                raw, server_hostname="localhost"
            )
            cipher = sock.cipher()
            info = TLSInfo(
                sock.selected_alpn_protocol(),
                sock.version(),
                cipher[0] if cipher else None,
                _key_description(sock.getpeercert(binary_form=True)),
            )
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        status, body = _decode_response(b"".join(chunks))
        return status, body, info


def alpn_probe(port: int, ca: Path, offer: Sequence[str], timeout: float = 5.0) -> str | None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        _client_context(ca, offer).wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return sock.selected_alpn_protocol()


def wait_ready(
    proc: Managed,
    port: int,
    *,
    timeout: float,
    tls_ca: Path | None = None,
) -> TLSInfo | None:
    """Poll until GET / answers 200 (over verified TLS when tls_ca is given)."""
    deadline = time.monotonic() + timeout
    last: Exception | str = "not tried"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with code {proc.popen.returncode}; last log lines:\n"
                f"{proc.log_tail()}"
            )
        if tls_ca is not None and not tls_ca.exists():
            last = f"{tls_ca} does not exist yet"
        else:
            try:
                status, _, info = http_get(port, "/", tls_ca=tls_ca, timeout=2.0)
                if status == 200:
                    return info
                last = f"status {status}"
            except (OSError, BenchError, ValueError, IndexError) as exc:
                last = exc
        time.sleep(0.2)
    raise BenchError(
        f"{proc.name} not ready on 127.0.0.1:{port} after {timeout:.0f}s ({last}); "
        f"last log lines:\n{proc.log_tail()}"
    )


# --------------------------------------------------------------------------- h2load


@dataclass
class Target:
    name: str  # "backend", "port443", "nginx"
    port: int
    proc: Managed
    ca: Path | None = None  # TLS targets: the CA their certificate chains to

    def url(self, path: str) -> str:
        scheme = "https" if self.ca else "http"
        return f"{scheme}://localhost:{self.port}{path}"


@dataclass(frozen=True)
class Load:
    """One h2load invocation's shape."""

    proto: str  # "h1" or "h2"
    path: str  # key of PATHS
    requests: int
    clients: int
    streams: int  # concurrent streams per client (1 for h1)

    def argv(self, h2load: str, target: Target, log_file: Path) -> list[str]:
        argv = [h2load, "-n", str(self.requests), "-c", str(self.clients), "-t", "1"]
        argv += ["--h1"] if self.proto == "h1" else ["-m", str(self.streams)]
        argv.append(f"--log-file={log_file}")
        # SNI and Host say "localhost"; the TCP connection goes to 127.0.0.1 whatever
        # "localhost" resolves to.
        argv += [f"--connect-to=127.0.0.1:{target.port}", target.url(PATHS[self.path][0])]
        return argv


@dataclass
class RunResult:
    target: str
    proto: str
    path: str
    requests: int
    clients: int
    streams: int
    ok: bool = False
    note: str = ""
    app_protocol: str | None = None
    wall_s: float = 0.0
    rps: float | None = None
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    non_2xx: int = 0
    mean_us: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    max_us: float | None = None
    server_cpu_s: float | None = None
    server_sys_fraction: float | None = None
    cpu_source: str | None = None
    backend_cpu_s: float | None = None
    cpu_us_per_req: float | None = None
    req_per_cpu_s: float | None = None
    backend_cpu_us_per_req: float | None = None

    @classmethod
    def start(cls, target: str, load: Load) -> RunResult:
        return cls(target, load.proto, load.path, load.requests, load.clients, load.streams)


_DURATION_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_h2load(text: str, res: RunResult) -> None:
    """Fill `res` from h2load's summary output."""
    if m := re.search(r"Application protocol: (\S+)", text):
        res.app_protocol = m.group(1)
    if m := re.search(r"finished in \S+, ([\d.]+) req/s", text):
        res.rps = float(m.group(1))
    if m := re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    ):
        res.succeeded, res.failed, res.errored, res.timeout = map(int, m.groups())
    if m := re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        res.non_2xx = sum(map(int, m.groups()))
    if m := re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", text):
        with contextlib.suppress(ValueError):
            res.mean_us = _to_us(m.group(1))


def read_latencies(log_file: Path, res: RunResult) -> None:
    """Mean, p50, p99 and max from h2load's --log-file (start, status, microseconds)."""
    latencies: list[float] = []
    with contextlib.suppress(OSError):
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and int(parts[1]) > 0:
                latencies.append(float(parts[2]))
    if latencies:
        latencies.sort()
        res.mean_us = statistics.fmean(latencies)
        res.p50_us = latencies[len(latencies) // 2]
        res.p99_us = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        res.max_us = latencies[-1]


def run_h2load(
    h2load: str, target: Target, backend: Managed, load: Load, workdir: Path, timeout: float
) -> RunResult:
    """One h2load run with the CPU of the target's and the backend's process trees around it."""
    res = RunResult.start(target.name, load)
    log_file = workdir / f"h2load-{target.name}-{load.proto}-{load.path}.tsv"
    cpu0, bcpu0 = tree_cpu(target.proc.pid), tree_cpu(backend.pid)
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            load.argv(h2load, target, log_file),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        res.note = f"h2load timed out after {timeout:.0f}s"
        return res
    res.wall_s = time.monotonic() - t0
    cpu1, bcpu1 = tree_cpu(target.proc.pid), tree_cpu(backend.pid)
    text = out.stdout + out.stderr
    parse_h2load(text, res)

    expected = "http/1.1" if load.proto == "h1" else "h2"
    if res.app_protocol is not None and res.app_protocol != expected:
        res.note = f"negotiated {res.app_protocol}, not {expected}"
        return res
    if out.returncode != 0 or res.succeeded == 0:
        lines = [ln for ln in text.splitlines() if ln.strip() and "progress" not in ln]
        res.note = f"h2load exit {out.returncode}: " + " | ".join(lines[-3:])[:300]
        return res
    read_latencies(log_file, res)
    with contextlib.suppress(OSError):
        log_file.unlink()

    server, backend_cpu = cpu_delta(cpu0, cpu1), cpu_delta(bcpu0, bcpu1)
    res.server_cpu_s, res.cpu_source = server.seconds, server.source
    res.server_sys_fraction = server.sys_fraction
    res.backend_cpu_s = backend_cpu.seconds
    res.cpu_us_per_req = server.seconds * 1e6 / res.succeeded
    res.backend_cpu_us_per_req = backend_cpu.seconds * 1e6 / res.succeeded
    res.req_per_cpu_s = res.succeeded / server.seconds if server.seconds > 0 else None
    bad = res.failed + res.errored + res.timeout + res.non_2xx
    res.ok = bad <= load.requests * 0.001
    if bad:
        res.note = (
            f"{res.failed} failed, {res.errored} errored, {res.timeout} timeout, "
            f"{res.non_2xx} non-2xx"
        )
    return res


# --------------------------------------------------------------------------- report


SUMMARY_FIELDS = (
    "rps",
    "mean_us",
    "p99_us",
    "cpu_us_per_req",
    "req_per_cpu_s",
    "server_sys_fraction",
    "backend_cpu_us_per_req",
)


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (proto, path, target): medians over the repeats that succeeded."""
    rows: list[dict[str, Any]] = []
    for proto, path, target in dict.fromkeys((r.proto, r.path, r.target) for r in runs):
        group = [r for r in runs if (r.proto, r.path, r.target) == (proto, path, target)]
        good = [r for r in group if r.ok]
        row: dict[str, Any] = {"proto": proto, "path": path, "target": target}
        row["runs"], row["ok"] = len(good), bool(good)
        notes = [r.note for r in (good or group) if r.note]
        row["note"] = "; ".join(dict.fromkeys(notes)) or ("" if good else "failed")
        for attr in SUMMARY_FIELDS:
            row[attr] = _median([getattr(r, attr) for r in good])
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """port443 / nginx for each (proto, path) that has both rows."""
    out = []
    by_key = {(r["proto"], r["path"], r["target"]): r for r in rows}
    for proto, path in dict.fromkeys((r["proto"], r["path"]) for r in rows):
        p, n = by_key.get((proto, path, "port443")), by_key.get((proto, path, "nginx"))
        if not p or not n:
            continue
        item: dict[str, Any] = {"proto": proto, "path": path}
        for key, field_ in (("rps", "rps"), ("cpu_per_req", "cpu_us_per_req"), ("p99", "p99_us")):
            a, b = p[field_], n[field_]
            item[key] = a / b if p["ok"] and n["ok"] and a and b else None
        out.append(item)
    return out


def _fmt(value: float | None, spec: str, prefix: str = "") -> str:
    return "n/a" if value is None else f"{prefix}{value:{spec}}"


def _lat(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us / 1000:.2f}ms" if us >= 1000 else f"{us:.0f}us"


def print_report(
    rows: list[dict[str, Any]], rats: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    a = meta["args"]
    print()
    print(
        f"port443 bench: {a['requests']} requests per run, h1 -c {a['connections']}, "
        f"h2 -c {a['h2_connections']} -m {a['streams']}, median of {a['repeat']}; "
        f"{meta['cpus']} CPUs shared by h2load, backend and proxy "
        f"(load average at start {meta['loadavg_at_start'][0]:.1f})"
    )
    print(
        "CPU = on-CPU time of the target's process tree (nginx: master + worker) per request; "
        "sys = its kernel share"
    )
    header = (
        f"{'proto':5} {'path':5} {'target':8} {'req/s':>7} {'mean':>8} {'p99':>8} "
        f"{'CPU us/req':>10} {'req/CPU-s':>9} {'sys':>4} {'backend us/req':>14}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        start = f"{r['proto']:5} {r['path']:5} {r['target']:8} "
        if not r["ok"]:
            print(f"{start}{'n/a':>7}  {r['note']}")
            continue
        frac = r["server_sys_fraction"]
        sys_pct = "n/a" if frac is None else f"{frac * 100:.0f}%"
        print(
            f"{start}{_fmt(r['rps'], '.0f'):>7} {_lat(r['mean_us']):>8} {_lat(r['p99_us']):>8} "
            f"{_fmt(r['cpu_us_per_req'], '.1f'):>10} {_fmt(r['req_per_cpu_s'], '.0f'):>9} "
            f"{sys_pct:>4} {_fmt(r['backend_cpu_us_per_req'], '.1f'):>14}  {r['note']}"
        )
    if rats:
        print()
        print(f"{'port443 / nginx':17} {'req/s':>7} {'CPU/req':>8} {'p99':>7}")
        for x in rats:
            print(
                f"  {x['proto'] + ' ' + x['path']:15} {_fmt(x['rps'], '.2f', 'x'):>7} "
                f"{_fmt(x['cpu_per_req'], '.2f', 'x'):>8} {_fmt(x['p99'], '.2f', 'x'):>7}"
            )
    print()
    print(
        "Caddy reference (not run): ~{h1:.0f} us CPU per h1 request over TLS, "
        "~{h2:.0f} us per h2 request".format(**CADDY_REFERENCE)
    )


# --------------------------------------------------------------------------- port443


def port443_toml(port: int, certs_dir: Path, backend_port: int) -> str:
    return f"""# written by bench/run.py
log_level = "warning"

[listen]
address = "127.0.0.1"
http = 0
https = {port}

[certs]
dir = "{certs_dir}"
issuer = "local"

[access_log]
enabled = false  # like the reference nginx (access_log off)

[admin]
enabled = false  # metrics stay on; no fixed admin port to collide with

[[sites]]
hosts = ["localhost"]
upstreams = ["http://127.0.0.1:{backend_port}"]
"""


# Runs `python -m proxy ...` under cProfile with a CPU-time clock, so that time spent waiting
# in epoll or preempted by the other processes on this small machine is not charged to the
# function that happened to be running. Written on SIGINT / exit.
_CPROFILE_LAUNCHER = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["proxy", *sys.argv[2:]]
prof = cProfile.Profile(time.process_time)
prof.enable()
try:
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)
except (SystemExit, KeyboardInterrupt):
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""


def start_port443(python: Path, toml: Path, workdir: Path, cprofile: str | None) -> Managed:
    args = ["run", "-c", str(toml)]
    if cprofile:
        argv = [str(python), "-c", _CPROFILE_LAUNCHER, cprofile, *args]
    else:
        argv = [str(python), "-m", "proxy", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # SIGINT: the graceful path, and the one that lets cProfile write its file.
    return start_process(
        "port443", argv, workdir / "port443.log", stop_signal=signal.SIGINT, env=env, cwd=REPO
    )


def print_cprofile(path: str, limit: int = 30) -> None:
    import pstats

    if not Path(path).exists():
        log(f"cProfile output {path} was not written (did port443 exit on SIGINT?)")
        return
    print(f"\ncProfile of port443 (CPU time, all runs incl. warm-up; {path}), top {limit}:")
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(limit)


# --------------------------------------------------------------------------- py-spy


def _short_frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py)" with --nolineno.
    m = re.fullmatch(r"(.*) \((.*)\)", frame)
    if not m:
        return frame
    func, file = m.groups()
    for marker in ("/site-packages/", str(REPO) + "/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file})"


def pyspy_summary(raw_path: Path, limit: int = 25) -> dict[str, Any]:
    """Top functions by own and inclusive share of the samples in a py-spy raw file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100.0 * c / total) for f, c in counter.most_common(limit)]

    if total == 0:
        return {"samples": 0, "own": [], "inclusive": []}
    return {"samples": total, "own": top(own), "inclusive": top(inclusive)}


# --------------------------------------------------------------------------- the bench


class Bench:
    """One benchmark session: owns the temp dir, the server processes and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h2load = find_tool("h2load")
        self.nginx = find_tool("nginx", "/usr/sbin/nginx")
        self.pyspy: str | None = None
        if args.py_spy:
            found = shutil.which(args.py_spy)
            if not found:
                raise BenchError(f"py-spy not found at {args.py_spy!r} (pip install py-spy)")
            self.pyspy = found
        if "port443" in args.targets and not args.python.exists():
            raise BenchError(f"{args.python} not found (create the venv or pass --python)")
        env_profile = os.environ.get("BENCH_CPROFILE")
        self.cprofile = str(Path(env_profile).resolve()) if env_profile else None
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.workdir = Path(tempfile.mkdtemp(prefix="port443-bench-"))
        self.procs: list[Managed] = []
        self.targets: dict[str, Target] = {}
        self.tls_info: dict[str, Any] = {}
        self.h2_alpn: dict[str, str | None] = {}
        self.runs: list[RunResult] = []
        self.loadavg = os.getloadavg()
        log(f"work dir {self.workdir}")

    @property
    def backend(self) -> Managed:
        return self.targets["backend"].proc

    # ---- servers

    def start_servers(self) -> None:
        args = self.args
        backend_port, nginx_port, p443_port = free_ports(3)

        prefix = self.workdir / "backend"
        (prefix / "html").mkdir(parents=True)
        (prefix / "html" / "16k").write_bytes(BIG_BODY)
        proc = start_nginx(self.nginx, "backend nginx", prefix, backend_conf(prefix, backend_port))
        self.procs.append(proc)
        wait_ready(proc, backend_port, timeout=args.start_timeout)
        self.targets["backend"] = Target("backend", backend_port, proc)

        if "nginx" in args.targets:
            prefix = self.workdir / "nginx-tls"
            prefix.mkdir()
            ca, chain, key = mint_ca_and_leaf(prefix)
            conf = tls_proxy_conf(prefix, nginx_port, backend_port, chain, key)
            proc = start_nginx(self.nginx, "nginx TLS proxy", prefix, conf)
            self.procs.append(proc)
            self._add_tls_target(Target("nginx", nginx_port, proc, ca))

        if "port443" in args.targets:
            pdir = self.workdir / "port443"
            certs = pdir / "certs"
            certs.mkdir(parents=True)
            toml = pdir / "port443.toml"
            toml.write_text(port443_toml(p443_port, certs, backend_port))
            proc = start_port443(args.python, toml, pdir, self.cprofile)
            self.procs.append(proc)
            self._add_tls_target(Target("port443", p443_port, proc, certs / "local" / "root.pem"))

    def _add_tls_target(self, target: Target) -> None:
        assert target.ca is not None
        info = wait_ready(
            target.proc, target.port, timeout=self.args.start_timeout, tls_ca=target.ca
        )
        self.tls_info[target.name] = asdict(info) if info else None
        log(f"{target.name} TLS: {self.tls_info[target.name]}")
        try:  # h2 rows need ALPN to pick h2; otherwise they say n/a
            self.h2_alpn[target.name] = alpn_probe(target.port, target.ca, ["h2", "http/1.1"])
        except (OSError, ssl.SSLError) as exc:
            self.h2_alpn[target.name] = f"error: {exc}"
        self.targets[target.name] = target

    def check_bodies(self) -> None:
        """Every target serves both bodies intact before anything is measured."""
        for t in self.targets.values():
            for path, body in PATHS.values():
                status, got, _ = http_get(t.port, path, tls_ca=t.ca)
                if status != 200 or got != body:
                    raise BenchError(
                        f"{t.name} GET {path}: status {status}, {len(got)} body bytes "
                        f"(want 200, {len(body)})"
                    )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.cprofile and "port443" in self.targets:
            print_cprofile(self.cprofile)
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- measuring

    @property
    def protos(self) -> list[str]:
        return [self.args.only] if self.args.only else ["h1", "h2"]

    def load(self, proto: str, path: str, requests: int | None = None) -> Load:
        args = self.args
        if proto == "h1":
            return Load(proto, path, requests or args.requests, args.connections, 1)
        return Load(proto, path, requests or args.requests, args.h2_connections, args.streams)

    def run(self, name: str, load: Load) -> RunResult:
        target = self.targets[name]
        if not target.proc.alive():
            raise BenchError(f"{name} died:\n{target.proc.log_tail()}")
        return run_h2load(
            self.h2load, target, self.backend, load, self.workdir, self.args.run_timeout
        )

    def measure(self) -> None:
        args = self.args
        for proto in self.protos:
            names = [n for n in ("backend", "port443", "nginx") if n in self.targets]
            if proto == "h2":
                names.remove("backend")
            for path in args.paths:
                load = self.load(proto, path)
                ready = []
                for name in names:
                    if proto == "h2" and self.h2_alpn.get(name) != "h2":
                        res = RunResult.start(name, load)
                        res.note = f"no h2 (ALPN chose {self.h2_alpn.get(name)!r})"
                        log(f"{proto} {path} {name}: n/a, {res.note}")
                        self.runs.append(res)
                        continue
                    log(f"{proto} {path} {name}: warm-up {args.warmup}")
                    warm = self.run(name, self.load(proto, path, args.warmup))
                    if not warm.ok:
                        log(f"{proto} {path} {name}: warm-up failed ({warm.note}), n/a")
                        res = RunResult.start(name, load)
                        res.note = f"warm-up: {warm.note}"
                        self.runs.append(res)
                        continue
                    ready.append(name)
                for rep in range(args.repeat):  # round-robin, so drift hits all alike
                    for name in ready:
                        res = self.run(name, load)
                        log(
                            f"{proto} {path} {name} [{rep + 1}/{args.repeat}]: "
                            f"{_fmt(res.rps, '.0f')} req/s, "
                            f"{_fmt(res.cpu_us_per_req, '.1f')} us CPU/req {res.note}"
                        )
                        self.runs.append(res)

    def profile_pyspy(self) -> dict[str, Any]:
        """One extra, unmeasured run per protocol on "/" with py-spy sampling port443."""
        profiles: dict[str, Any] = {}
        if not self.pyspy or "port443" not in self.targets:
            return profiles
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        for proto in self.protos:
            if proto == "h2" and self.h2_alpn.get("port443") != "h2":
                continue
            raw = RESULTS_DIR / f"pyspy-{self.stamp}-{proto}.txt"
            argv = [self.pyspy, "record", "--pid", str(self.targets["port443"].proc.pid)]
            argv += ["--format", "raw", "--nolineno", "--rate", "250", "--output", str(raw)]
            rec = start_process(
                "py-spy", argv, self.workdir / f"pyspy-{proto}.log", stop_signal=signal.SIGINT
            )
            try:
                time.sleep(1.0)  # let it attach
                if not rec.alive():
                    log(f"py-spy failed: {rec.log_tail()}")
                    continue
                res = self.run("port443", self.load(proto, "small"))
            finally:
                rec.stop(grace=20.0)
            if not raw.exists():
                log(f"py-spy wrote nothing: {rec.log_tail()}")
                continue
            summary = pyspy_summary(raw)
            summary["raw_file"] = str(raw)
            summary["run_under_profiler"] = asdict(res)
            profiles[proto] = summary
            print(
                f"\npy-spy, port443 {proto} '/', {summary['samples']} samples of the thread "
                f"running or runnable ({_fmt(res.rps, '.0f')} req/s while sampled); {raw}"
            )
            for title, key in (("own time", "own"), ("inclusive time", "inclusive")):
                print(f"  top by {title}:")
                for frame, pct in summary[key][:20]:
                    print(f"    {pct:5.1f}%  {frame}")
        return profiles

    # ---- results

    def meta(self) -> dict[str, Any]:
        def version(argv: list[str]) -> str:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
            return (out.stdout + out.stderr).strip()

        return {
            "time": dt.datetime.now().isoformat(timespec="seconds"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
            "cpus": os.cpu_count(),
            "loadavg_at_start": self.loadavg,
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "nginx": version([self.nginx, "-v"]),
            "h2load": version([self.h2load, "--version"]),
            "tls": self.tls_info,
            "h2_alpn": self.h2_alpn,
            "cprofile": self.cprofile,
            "caddy_reference_us_per_req": CADDY_REFERENCE,
        }

    def report(self) -> None:
        rows = summarize(self.runs)
        rats = ratios(rows)
        meta = self.meta()
        print_report(rows, rats, meta)
        profiles = self.profile_pyspy()
        if self.args.no_json:
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"bench-{self.stamp}.json"
        document = {
            "meta": meta,
            "summary": rows,
            "ratios": rats,
            "runs": [asdict(r) for r in self.runs],
            "py_spy": profiles,
        }
        out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nJSON: {out}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", "-n", type=int, default=20000, help="requests per run (20000)")
    p.add_argument("--connections", "-c", type=int, default=16, help="h1 clients (16)")
    p.add_argument("--h2-connections", type=int, default=8, help="h2 clients (8)")
    p.add_argument("--streams", "-m", type=int, default=16, help="h2 streams per client (16)")
    p.add_argument("--only", choices=("h1", "h2"), help="run one protocol only")
    p.add_argument("--paths", default="small,16k", help="comma list of: small (/, 6 B), 16k (/16k)")
    p.add_argument(
        "--targets", default="backend,port443,nginx", help="comma list of targets (all three)"
    )
    p.add_argument("--repeat", type=int, default=1, help="measured runs per target, median (1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (N/10, >= 1000)")
    p.add_argument("--run-timeout", type=float, default=180.0, help="seconds per h2load run")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds per server start")
    p.add_argument("--python", type=Path, default=DEFAULT_PYTHON, help="python running port443")
    p.add_argument(
        "--py-spy",
        nargs="?",
        const="py-spy",
        default=None,
        metavar="BIN",
        help="afterwards, sample port443 with py-spy during one extra run per protocol",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    args.targets = [x for x in args.targets.split(",") if x]
    if bad := [x for x in args.paths if x not in PATHS]:
        p.error(f"unknown path(s) {bad}; choose from {list(PATHS)}")
    if bad := [x for x in args.targets if x not in ("backend", "port443", "nginx")]:
        p.error(f"unknown target(s) {bad}; choose from backend, port443, nginx")
    if min(args.requests, args.repeat, args.connections, args.h2_connections, args.streams) < 1:
        p.error("counts must be positive")
    if args.warmup is None:
        args.warmup = min(args.requests, max(1000, args.requests // 10))
    return args


def find_tool(name: str, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        if found := shutil.which(candidate):
            return found
    package = "nghttp2-client" if name == "h2load" else "nginx-light"
    raise BenchError(f"{name} not found; install it (Debian: apt-get install {package})")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every server."""

    def handler(signum: int, frame: FrameType | None) -> None:
        print("bench: terminated, stopping servers", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_exit():
            bench = Bench(args)
            try:
                bench.start_servers()
                bench.check_bodies()
                bench.measure()
                bench.report()
            finally:
                bench.stop()
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted, servers stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
