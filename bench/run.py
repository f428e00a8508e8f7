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

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"

SMALL_BODY = b"hello\n"
BIG_BODY = (b"port443 bench payload, 64 bytes per line, repeated to 16 KiB..\n" * 256)[:16384]
PATHS = {"small": ("/", SMALL_BODY), "16k": ("/16k", BIG_BODY)}

CADDY_REFERENCE = {"h1": 68.0, "h2": 128.0}  # µs of CPU per request over TLS, not run here

CLK_TCK = os.sysconf("SC_CLK_TCK")

MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


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


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks: utime + stime + cutime + cstime) for every visible process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (raw := _read(f"/proc/{entry}/stat")) is None:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        # rest[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
        ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        table[int(entry)] = (int(rest[1]), ticks)
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
    ticks_s: float  # utime+stime (+ reaped children), whole tree, 1/CLK_TCK resolution
    sched_s: float | None  # live threads' schedstat run time, whole tree, ns resolution
    pids: int


def tree_cpu(root: int) -> CPUSample:
    """CPU time used so far by `root` and all its descendants (nginx master + workers).

    Reaped children's time shows up in their parent's cutime/cstime, so the tick sum stays
    continuous if a worker is replaced between two readings.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks, sched, count, stack = 0, 0.0, 0, [root]
    sched_ok = True
    while stack:
        pid = stack.pop()
        if pid in table:
            ticks += table[pid][1]
            count += 1
            s = _sched_seconds(pid)
            if s is None:
                sched_ok = False
            else:
                sched += s
        stack.extend(children.get(pid, ()))
    return CPUSample(ticks / CLK_TCK, sched if sched_ok else None, count)


def cpu_delta(before: CPUSample, after: CPUSample) -> tuple[float, str]:
    """CPU seconds between two samples and where they came from.

    /proc/<pid>/stat counts in clock ticks (10 ms), which is coarse for nginx's few hundred
    ms per run; schedstat has the same total in ns. It is used unless it disagrees with the
    tick count by more than the ticks' rounding (a thread exited mid-run, say).
    """
    ticks = after.ticks_s - before.ticks_s
    if before.sched_s is None or after.sched_s is None:
        return ticks, "stat"
    sched = after.sched_s - before.sched_s
    tolerance = 2 * max(before.pids, after.pids) / CLK_TCK + 0.05 * ticks
    if abs(sched - ticks) <= tolerance:
        return sched, "schedstat"
    return ticks, "stat"


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
        ssl_ciphers {MOZILLA_INTERMEDIATE_CIPHERS};
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
    tls: bool
    proc: Managed
    ca: Path | None = None

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://localhost:{self.port}{path}"


@dataclass
class RunResult:
    target: str
    proto: str
    path: str
    requests: int
    clients: int
    streams: int
    ok: bool
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
    cpu_source: str | None = None
    backend_cpu_s: float | None = None
    cpu_us_per_req: float | None = None
    req_per_cpu_s: float | None = None
    backend_cpu_us_per_req: float | None = None


_DURATION_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def h2load_argv(
    h2load: str, target: Target, path: str, proto: str, n: int, c: int, m: int, log_file: Path
) -> list[str]:
    argv = [h2load, "-n", str(n), "-c", str(c), "-t", "1", f"--log-file={log_file}"]
    argv += ["--h1"] if proto == "h1" else ["-m", str(m)]
    # SNI and Host say "localhost"; the TCP connection goes to 127.0.0.1 whatever it resolves to.
    argv += [f"--connect-to=127.0.0.1:{target.port}", target.url(path)]
    return argv


def run_h2load(
    h2load: str,
    target: Target,
    backend: Managed,
    path_key: str,
    proto: str,
    n: int,
    c: int,
    m: int,
    workdir: Path,
    timeout: float,
) -> RunResult:
    path = PATHS[path_key][0]
    res = RunResult(target.name, proto, path_key, n, c, m if proto == "h2" else 1, ok=False)
    log_file = workdir / f"h2load-{target.name}-{proto}-{path_key}.tsv"
    argv = h2load_argv(h2load, target, path, proto, n, c, m, log_file)
    cpu0, bcpu0 = tree_cpu(target.proc.pid), tree_cpu(backend.pid)
    t0 = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        res.note = f"h2load timed out after {timeout:.0f}s"
        return res
    res.wall_s = time.monotonic() - t0
    cpu1, bcpu1 = tree_cpu(target.proc.pid), tree_cpu(backend.pid)
    text = out.stdout + out.stderr

    if m_ := re.search(r"Application protocol: (\S+)", text):
        res.app_protocol = m_.group(1)
    if m_ := re.search(r"finished in \S+, ([\d.]+) req/s", text):
        res.rps = float(m_.group(1))
    if m_ := re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    ):
        res.succeeded, res.failed, res.errored, res.timeout = map(int, m_.groups())
    if m_ := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text):
        res.non_2xx = sum(map(int, m_.groups()[1:]))
    if m_ := re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text):
        with contextlib.suppress(ValueError):
            res.mean_us = _to_us(m_.group(3))

    expected = "http/1.1" if proto == "h1" else "h2"
    if res.app_protocol is not None and res.app_protocol != expected:
        res.note = f"negotiated {res.app_protocol}, not {expected}"
        return res
    if out.returncode != 0 or res.succeeded == 0:
        lines = [ln for ln in text.splitlines() if ln.strip() and "progress" not in ln]
        res.note = f"h2load exit {out.returncode}: " + " | ".join(lines[-3:])[:300]
        return res

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
    with contextlib.suppress(OSError):
        log_file.unlink()

    res.server_cpu_s, res.cpu_source = cpu_delta(cpu0, cpu1)
    res.backend_cpu_s, _ = cpu_delta(bcpu0, bcpu1)
    res.cpu_us_per_req = res.server_cpu_s * 1e6 / res.succeeded
    res.backend_cpu_us_per_req = res.backend_cpu_s * 1e6 / res.succeeded
    res.req_per_cpu_s = res.succeeded / res.server_cpu_s if res.server_cpu_s > 0 else None
    bad = res.failed + res.errored + res.timeout + res.non_2xx
    res.ok = bad <= n * 0.001
    if bad:
        res.note = (
            f"{res.failed} failed, {res.errored} errored, {res.timeout} timeout, "
            f"{res.non_2xx} non-2xx"
        )
    return res


# --------------------------------------------------------------------------- report


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per (proto, path, target): medians over the repeats that succeeded."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r.proto, r.path, r.target) for r in runs))
    for proto, path, target in keys:
        group = [r for r in runs if (r.proto, r.path, r.target) == (proto, path, target)]
        good = [r for r in group if r.ok]
        row: dict[str, Any] = {"proto": proto, "path": path, "target": target, "runs": len(group)}
        if not good:
            row["ok"] = False
            row["note"] = next((r.note for r in group if r.note), "failed")
        else:
            row["ok"] = True
            row["note"] = "; ".join(dict.fromkeys(r.note for r in group if r.note))
            for attr in (
                "rps",
                "mean_us",
                "p99_us",
                "cpu_us_per_req",
                "req_per_cpu_s",
                "backend_cpu_us_per_req",
            ):
                row[attr] = _median([getattr(r, attr) for r in good])
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by_key = {(r["proto"], r["path"], r["target"]): r for r in rows}
    for proto, path in dict.fromkeys((r["proto"], r["path"]) for r in rows):
        p, n = by_key.get((proto, path, "port443")), by_key.get((proto, path, "nginx"))
        if not p or not n:
            continue
        item: dict[str, Any] = {"proto": proto, "path": path}
        if p["ok"] and n["ok"]:
            item["rps"] = p["rps"] / n["rps"]
            item["cpu_per_req"] = p["cpu_us_per_req"] / n["cpu_us_per_req"]
            item["p99"] = p["p99_us"] / n["p99_us"] if p["p99_us"] and n["p99_us"] else None
        else:
            item["note"] = "n/a"
        out.append(item)
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


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
        f"h2 -c {a['h2_connections']} -m {a['streams']}, repeats {a['repeat']}, "
        f"{meta['cpus']} CPUs shared by h2load, backend and proxy"
    )
    print("CPU = utime+stime of the target's process tree (nginx: master + worker) per request")
    header = (
        f"{'proto':5} {'path':5} {'target':8} {'req/s':>9} {'mean':>8} {'p99':>8} "
        f"{'CPU us/req':>10} {'req/CPU-s':>9} {'backend us/req':>14}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r["ok"]:
            print(
                f"{r['proto']:5} {r['path']:5} {r['target']:8} {'n/a':>9} {'':>8} {'':>8} "
                f"{'':>10} {'':>9} {'':>14}  {r['note']}"
            )
            continue
        print(
            f"{r['proto']:5} {r['path']:5} {r['target']:8} {_fmt(r['rps'], '.0f'):>9} "
            f"{_lat(r['mean_us']):>8} {_lat(r['p99_us']):>8} "
            f"{_fmt(r['cpu_us_per_req'], '.1f'):>10} {_fmt(r['req_per_cpu_s'], '.0f'):>9} "
            f"{_fmt(r['backend_cpu_us_per_req'], '.1f'):>14}  {r['note']}"
        )
    if rats:
        print()
        print("port443 / nginx       req/s    CPU per request    p99 latency")
        for x in rats:
            label = f"{x['proto']} {x['path']}"
            if "note" in x:
                print(f"  {label:18} n/a")
                continue
            p99 = "n/a" if x["p99"] is None else f"x{x['p99']:.2f}"
            print(f"  {label:18} x{x['rps']:<8.2f} x{x['cpu_per_req']:<17.2f} {p99}")
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

[[sites]]
hosts = ["localhost"]
upstreams = ["http://127.0.0.1:{backend_port}"]
"""


def start_port443(python: Path, toml: Path, workdir: Path, cprofile: str | None) -> Managed:
    argv = [str(python)]
    if cprofile:
        argv += ["-m", "cProfile", "-o", cprofile]
    argv += ["-m", "proxy", "run", "-c", str(toml)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # SIGINT: the graceful path, and the one that lets cProfile write its file.
    return start_process(
        "port443", argv, workdir / "port443.log", stop_signal=signal.SIGINT, env=env, cwd=REPO
    )


def print_cprofile(path: str, limit: int = 30) -> None:
    import pstats

    if not Path(path).exists():
        log(f"cProfile output {path} was not written (did port443 exit on SIGINT?)")
        return
    print(f"\ncProfile of port443 ({path}), top {limit} by own time:")
    pstats.Stats(path).sort_stats("tottime").print_stats(limit)


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
    if total == 0:
        return {"samples": 0, "own": [], "inclusive": []}

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100.0 * c / total) for f, c in counter.most_common(limit)]

    return {"samples": total, "own": top(own), "inclusive": top(inclusive)}


def pyspy_profile(
    pyspy: str,
    h2load: str,
    target: Target,
    backend: Managed,
    proto: str,
    args: argparse.Namespace,
    workdir: Path,
    out_dir: Path,
    stamp: str,
) -> dict[str, Any] | None:
    raw = out_dir / f"pyspy-{stamp}-{proto}.txt"
    rec = start_process(
        "py-spy",
        [
            pyspy,
            "record",
            "--pid",
            str(target.proc.pid),
            "--format",
            "raw",
            "--nolineno",
            "--rate",
            "250",
            "--output",
            str(raw),
        ],
        workdir / f"pyspy-{proto}.log",
        stop_signal=signal.SIGINT,
    )
    try:
        time.sleep(1.0)  # let py-spy attach
        if not rec.alive():
            log(f"py-spy failed: {rec.log_tail()}")
            return None
        c = args.connections if proto == "h1" else args.h2_connections
        res = run_h2load(
            h2load,
            target,
            backend,
            "small",
            proto,
            args.requests,
            c,
            args.streams,
            workdir,
            args.run_timeout,
        )
    finally:
        rec.stop(grace=20.0)
    if not raw.exists():
        log(f"py-spy wrote nothing: {rec.log_tail()}")
        return None
    summary = pyspy_summary(raw)
    summary["raw_file"] = str(raw)
    summary["run_under_profiler"] = asdict(res)
    print(
        f"\npy-spy, port443 {proto} small, {summary['samples']} samples on CPU "
        f"(run under the profiler: {_fmt(res.rps, '.0f')} req/s); raw stacks: {raw}"
    )
    for title, key in (("own time", "own"), ("inclusive", "inclusive")):
        print(f"  top by {title}:")
        for frame, pct in summary[key][:20]:
            print(f"    {pct:5.1f}%  {frame}")
    return summary


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", "-n", type=int, default=20000, help="requests per run (20000)")
    p.add_argument("--connections", "-c", type=int, default=16, help="h1 clients (16)")
    p.add_argument("--h2-connections", type=int, default=8, help="h2 clients (8)")
    p.add_argument("--streams", "-m", type=int, default=16, help="h2 streams per client (16)")
    p.add_argument("--only", choices=("h1", "h2"), help="run one protocol only")
    p.add_argument(
        "--paths", default="small,16k", help="comma list of: small (/ -> 6 B), 16k (/16k)"
    )
    p.add_argument("--targets", default="backend,port443,nginx", help="comma list of targets")
    p.add_argument("--repeat", type=int, default=1, help="measured runs per target (median)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (N/10, >=1000)")
    p.add_argument("--run-timeout", type=float, default=180.0, help="seconds per h2load run")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a server start")
    p.add_argument("--python", type=Path, default=DEFAULT_PYTHON, help="python running port443")
    p.add_argument(
        "--py-spy",
        nargs="?",
        const="py-spy",
        default=None,
        metavar="BIN",
        help="after measuring, profile port443 with py-spy during one extra run per protocol",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    args.paths = [x for x in args.paths.split(",") if x]
    args.targets = [x for x in args.targets.split(",") if x]
    if bad := [x for x in args.paths if x not in PATHS]:
        p.error(f"unknown path(s) {bad}; choose from {list(PATHS)}")
    if bad := [x for x in args.targets if x not in ("backend", "port443", "nginx")]:
        p.error(f"unknown target(s) {bad}")
    if args.requests < 1 or args.repeat < 1:
        p.error("--requests and --repeat must be positive")
    if args.warmup is None:
        args.warmup = min(args.requests, max(1000, args.requests // 10))
    return args


def find_tool(name: str, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate)
        if found:
            return found
    raise BenchError(
        f"{name} not found; install it (Debian: apt-get install "
        f"{'nghttp2-client' if name == 'h2load' else 'nginx-light'})"
    )


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        print("bench: terminated, stopping servers", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def bench(args: argparse.Namespace) -> int:
    h2load = find_tool("h2load")
    nginx = find_tool("nginx", "/usr/sbin/nginx")
    pyspy = None
    if args.py_spy:
        pyspy = shutil.which(args.py_spy) or (args.py_spy if Path(args.py_spy).exists() else None)
        if not pyspy:
            raise BenchError(f"py-spy not found at {args.py_spy!r} (pip install py-spy)")
    if "port443" in args.targets and not args.python.exists():
        raise BenchError(f"{args.python} not found (create the venv or pass --python)")
    cprofile = os.environ.get("BENCH_CPROFILE") or None
    if cprofile:
        cprofile = str(Path(cprofile).resolve())

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="port443-bench-"))
    procs: list[Managed] = []
    log(f"work dir {workdir}")
    try:
        backend_port, nginx_port, p443_port = free_ports(3)

        # Backend.
        bprefix = workdir / "backend"
        (bprefix / "html").mkdir(parents=True)
        (bprefix / "html" / "16k").write_bytes(BIG_BODY)
        backend_proc = start_nginx(
            nginx, "backend nginx", bprefix, backend_conf(bprefix, backend_port)
        )
        procs.append(backend_proc)
        wait_ready(backend_proc, backend_port, timeout=args.start_timeout)
        targets: dict[str, Target] = {
            "backend": Target("backend", backend_port, False, backend_proc)
        }
        tls_info: dict[str, Any] = {}

        # nginx TLS proxy.
        if "nginx" in args.targets:
            nprefix = workdir / "nginx-tls"
            nprefix.mkdir()
            ca, chain, key = mint_ca_and_leaf(nprefix)
            nproc = start_nginx(
                nginx,
                "nginx TLS proxy",
                nprefix,
                tls_proxy_conf(nprefix, nginx_port, backend_port, chain, key),
            )
            procs.append(nproc)
            info = wait_ready(nproc, nginx_port, timeout=args.start_timeout, tls_ca=ca)
            tls_info["nginx"] = asdict(info) if info else None
            targets["nginx"] = Target("nginx", nginx_port, True, nproc, ca)

        # port443.
        if "port443" in args.targets:
            pdir = workdir / "port443"
            certs = pdir / "certs"
            certs.mkdir(parents=True)
            toml = pdir / "port443.toml"
            toml.write_text(port443_toml(p443_port, certs, backend_port))
            pproc = start_port443(args.python, toml, pdir, cprofile)
            procs.append(pproc)
            root = certs / "local" / "root.pem"
            info = wait_ready(pproc, p443_port, timeout=args.start_timeout, tls_ca=root)
            tls_info["port443"] = asdict(info) if info else None
            targets["port443"] = Target("port443", p443_port, True, pproc, root)

        # Correctness: every target serves both bodies intact.
        for t in targets.values():
            for key_, (path, body) in PATHS.items():
                status, got, _ = http_get(t.port, path, tls_ca=t.ca)
                if status != 200 or got != body:
                    raise BenchError(
                        f"{t.name} GET {path}: status {status}, {len(got)} body bytes "
                        f"(want 200, {len(body)}) [{key_}]"
                    )
        for name, info_ in tls_info.items():
            log(f"{name} TLS: {info_}")

        # h2 support: ALPN must pick h2, else the h2 rows say n/a.
        h2_alpn: dict[str, str | None] = {}
        for name in ("port443", "nginx"):
            if name in targets:
                t = targets[name]
                assert t.ca is not None
                try:
                    h2_alpn[name] = alpn_probe(t.port, t.ca, ["h2", "http/1.1"])
                except (OSError, ssl.SSLError) as exc:
                    h2_alpn[name] = f"error: {exc}"

        runs: list[RunResult] = []
        protos = [args.only] if args.only else ["h1", "h2"]
        for proto in protos:
            names = [n for n in ("backend", "port443", "nginx") if n in targets]
            if proto == "h2":
                names = [n for n in names if n != "backend"]
            c = args.connections if proto == "h1" else args.h2_connections
            for path_key in args.paths:
                active = []
                for name in names:
                    if proto == "h2" and h2_alpn.get(name) != "h2":
                        note = f"no h2 (ALPN chose {h2_alpn.get(name)!r})"
                        log(f"{proto} {path_key} {name}: n/a, {note}")
                        runs.append(
                            RunResult(
                                name,
                                proto,
                                path_key,
                                args.requests,
                                c,
                                args.streams,
                                ok=False,
                                note=note,
                            )
                        )
                        continue
                    log(f"{proto} {path_key} {name}: warm-up {args.warmup}")
                    w = run_h2load(
                        h2load,
                        targets[name],
                        backend_proc,
                        path_key,
                        proto,
                        args.warmup,
                        c,
                        args.streams,
                        workdir,
                        args.run_timeout,
                    )
                    if not w.ok:
                        log(f"{proto} {path_key} {name}: warm-up failed ({w.note}), n/a")
                        w.requests = args.requests
                        runs.append(w)
                        continue
                    active.append(name)
                for rep in range(args.repeat):
                    for name in active:
                        if not targets[name].proc.alive():
                            raise BenchError(f"{name} died:\n{targets[name].proc.log_tail()}")
                        r = run_h2load(
                            h2load,
                            targets[name],
                            backend_proc,
                            path_key,
                            proto,
                            args.requests,
                            c,
                            args.streams,
                            workdir,
                            args.run_timeout,
                        )
                        log(
                            f"{proto} {path_key} {name} [{rep + 1}/{args.repeat}]: "
                            f"{_fmt(r.rps, '.0f')} req/s, {_fmt(r.cpu_us_per_req, '.1f')} us "
                            f"CPU/req {r.note}"
                        )
                        runs.append(r)

        rows = summarize(runs)
        rats = ratios(rows)
        meta: dict[str, Any] = {
            "time": dt.datetime.now().isoformat(timespec="seconds"),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "nginx": subprocess.run(
                [nginx, "-v"], capture_output=True, text=True, check=False
            ).stderr.strip(),
            "h2load": subprocess.run(
                [h2load, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "tls": tls_info,
            "h2_alpn": h2_alpn,
            "cprofile": cprofile,
            "caddy_reference_us_per_req": CADDY_REFERENCE,
        }
        print_report(rows, rats, meta)

        profiles: dict[str, Any] = {}
        if pyspy and "port443" in targets:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            for proto in protos:
                if proto == "h2" and h2_alpn.get("port443") != "h2":
                    continue
                prof = pyspy_profile(
                    pyspy,
                    h2load,
                    targets["port443"],
                    backend_proc,
                    proto,
                    args,
                    workdir,
                    RESULTS_DIR,
                    stamp,
                )
                if prof:
                    profiles[proto] = prof

        if not args.no_json:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            out = RESULTS_DIR / f"bench-{stamp}.json"
            out.write_text(
                json.dumps(
                    {
                        "meta": meta,
                        "summary": rows,
                        "ratios": rats,
                        "runs": [asdict(r) for r in runs],
                        "py_spy": profiles,
                    },
                    indent=2,
                )
                + "\n"
            )
            print(f"\nJSON: {out}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        if cprofile and any(p.name == "port443" for p in procs):
            print_cprofile(cprofile)
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_as_exit():
            return bench(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted, servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
