"""The systems under test and how each one starts: same backend, certificate and pinning.

One `Fixture` per run holds what every target shares: the work dir, one self-signed ECDSA
P-256 certificate for localhost, the nginx backend (1 worker, on the client core with h2load)
and the CPU sets. Each target is started as a child process group on the proxy core(s), with a
config written into the work dir from `bench/templates/`, and is ready when a GET over TLS
answers 200.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Group, Processes, pinned, wait_until

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "templates"
BODY_100K = (b"0123456789abcdef" * 6400)[:102400]
PEERS = ("nginx", "haproxy", "caddy")


@dataclass(frozen=True)
class Fixture:
    """What all targets of one run share."""

    work: Path
    cert: Path
    key: Path
    pem: Path  # cert + key in one file (HAProxy)
    proxy_cpus: str  # the system under test runs here
    client_cpus: str  # h2load, curl and the backend run here
    python: Path  # the interpreter that runs port443 (and the streaming sink)

    def dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Target:
    """A started system under test."""

    name: str  # "nginx", "haproxy", "caddy", "port443-2w"
    label: str  # as the report's columns say it: "nginx 1w", "port443 2w"
    port: int
    group: Group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_fixture(work: Path, *, proxy_cpus: str, client_cpus: str, python: Path) -> Fixture:
    """Lay out the work dir: certificate, the 100 KB body, dirs the servers write to."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    for sub in ("run", "logs", "tmp", "conf", "www"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx workers may run as another user
    (work / "www" / "100k.bin").write_bytes(BODY_100K)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pki = work / "pki"
    pki.mkdir(exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (pki / "cert.pem").write_bytes(cert_pem)
    (pki / "key.pem").write_bytes(key_pem)
    (pki / "combined.pem").write_bytes(cert_pem + key_pem)
    return Fixture(
        work=work,
        cert=pki / "cert.pem",
        key=pki / "key.pem",
        pem=pki / "combined.pem",
        proxy_cpus=proxy_cpus,
        client_cpus=client_cpus,
        python=python,
    )


def _nginx_user_line() -> str:
    # As root nginx workers would drop to "nobody"; keep them as the current user.
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    pw = pwd.getpwuid(os.geteuid())
    return f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};\n"


def render(fx: Fixture, template: str, *, name: str, port: int, backend_port: int) -> Path:
    """Fill `@KEY@` placeholders of a template; write it into the work dir's conf/."""
    values = {
        "WORK": str(fx.work),
        "CERT": str(fx.cert),
        "KEY": str(fx.key),
        "PEM": str(fx.pem),
        "NAME": name,
        "PORT": str(port),
        "BACKEND_PORT": str(backend_port),
        "WORKERS": "1",
        "USER_LINE": _nginx_user_line(),
    }
    text = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], (TEMPLATES / template).read_text())
    out = fx.work / "conf" / f"{name}-{template}"
    out.write_text(text)
    return out


def _get_status(url_port: int, path: str = "/", scheme: str = "https") -> str:
    """HTTP status of one GET by curl (000 when nothing answered)."""
    out = subprocess.run(
        [
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "-w",
            "%{http_code}",
            "--resolve",
            f"localhost:{url_port}:127.0.0.1",
            f"{scheme}://localhost:{url_port}{path}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "000"


def start_backend(fx: Fixture, procs: Processes) -> Target:
    """The nginx backend every target forwards to."""
    port = free_port()
    conf = render(fx, "backend-nginx.conf", name="backend", port=port, backend_port=port)
    argv = pinned(fx.client_cpus, ["nginx", "-p", f"{fx.work}/", "-c", str(conf)])
    group = procs.start("backend", argv, fx.work / "logs" / "backend.out")
    wait_until(
        lambda: _get_status(port, scheme="http") == "200", group, 15, "answer on the backend"
    )
    return Target(name="backend", label="backend", port=port, group=group)


def start_sink(fx: Fixture, procs: Processes) -> Target:
    """The streaming backend (bench/sink.py) for the 1 GB bodies."""
    port = free_port()
    argv = pinned(fx.client_cpus, [str(fx.python), str(REPO / "bench" / "sink.py"), str(port)])
    group = procs.start("sink", argv, fx.work / "logs" / "sink.out")
    wait_until(lambda: _get_status(port, "/ping", "http") == "200", group, 15, "sink answer")
    return Target(name="sink", label="sink", port=port, group=group)


def _start_nginx(fx: Fixture, procs: Processes, port: int, backend_port: int) -> Group:
    conf = render(fx, "nginx-proxy.conf", name="nginx", port=port, backend_port=backend_port)
    argv = pinned(fx.proxy_cpus, ["nginx", "-p", f"{fx.work}/", "-c", str(conf)])
    return procs.start("nginx", argv, fx.work / "logs" / "nginx.out")


def _start_haproxy(fx: Fixture, procs: Processes, port: int, backend_port: int) -> Group:
    conf = render(fx, "haproxy.cfg", name="haproxy", port=port, backend_port=backend_port)
    argv = pinned(fx.proxy_cpus, ["haproxy", "-db", "-f", str(conf)])
    return procs.start("haproxy", argv, fx.work / "logs" / "haproxy.out")


def _start_caddy(fx: Fixture, procs: Processes, port: int, backend_port: int) -> Group:
    conf = render(fx, "Caddyfile", name="caddy", port=port, backend_port=backend_port)
    home = fx.dir("caddy")
    env = dict(
        os.environ,
        GOMAXPROCS="1",
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    argv = pinned(fx.proxy_cpus, ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"])
    return procs.start("caddy", argv, fx.work / "logs" / "caddy.out", env=env)


PEER_STARTERS: dict[str, tuple[str, Callable[[Fixture, Processes, int, int], Group]]] = {
    "nginx": ("nginx 1w", _start_nginx),
    "haproxy": ("HAProxy 1t", _start_haproxy),
    "caddy": ("Caddy 1p", _start_caddy),
}


def port443_toml(fx: Fixture, *, port: int, upstream_port: int, workers: str) -> str:
    """port443's config: same certificate files, no access log or admin port, like the peers.

    `workers` other than "1" adds `[server] workers`, which the worker-process support brings;
    "1" leaves the table out so the config stays valid for the single-process code too.
    """
    server = ""
    if workers != "1":
        value = workers if workers.isdigit() else f'"{workers}"'
        server = f"\n[server]\nworkers = {value}\n"
    return f"""# written by bench/targets.py
log_level = "warning"
{server}
[listen]
address = "127.0.0.1"
http = 0
https = {port}
http3 = true  # the py-h3 case; h1 and h2 responses then carry Alt-Svc

[certs]
dir = "{fx.dir("port443-certs")}"
issuer = "files"

[access_log]
enabled = false

[admin]
enabled = false

[limits]
grace_period = 1.0
upstream_keepalive = 512  # idle upstream connections kept, as Caddy's keepalive_idle_conns

[[sites]]
hosts = ["localhost", "127.0.0.1"]
upstreams = ["http://127.0.0.1:{upstream_port}"]
cert = "{fx.cert}"
key = "{fx.key}"
"""


# BENCH_CPROFILE=<file.prof>: port443 runs under cProfile on the CPU clock (time spent waiting
# or preempted by the other processes is not charged), written when the bench stops it (SIGINT).
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


def _port443_argv(fx: Fixture, toml: Path) -> list[str]:
    if profile := os.environ.get("BENCH_CPROFILE"):
        launcher = [str(fx.python), "-c", _CPROFILE_LAUNCHER, str(Path(profile).resolve())]
        return pinned(fx.proxy_cpus, [*launcher, "run", "-c", str(toml)])
    return pinned(fx.proxy_cpus, [str(fx.python), "-m", "proxy", "run", "-c", str(toml)])


def _port443_env() -> dict[str, str]:
    # The checkout's proxy/ first, whatever the interpreter has installed.
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )


def start_port443(
    fx: Fixture, procs: Processes, *, port: int, upstream_port: int, workers: str, name: str
) -> Group:
    """port443 from this checkout; BenchError (the target is skipped) if the config is refused."""
    toml = fx.work / "conf" / f"{name}.toml"
    toml.write_text(port443_toml(fx, port=port, upstream_port=upstream_port, workers=workers))
    check = subprocess.run(
        [str(fx.python), "-m", "proxy", "check", "-c", str(toml)],
        capture_output=True,
        text=True,
        env=_port443_env(),
        cwd=REPO,
        check=False,
    )
    if check.returncode != 0:
        reason = " ".join((check.stdout + check.stderr).replace(str(toml), toml.name).split())
        if workers != "1" and "server" in reason:
            reason = f"this port443 does not accept [server] workers = {workers} yet ({reason})"
        raise BenchError(reason)
    return procs.start(
        name,
        _port443_argv(fx, toml),
        fx.work / "logs" / f"{name}.out",
        stop_signal=signal.SIGINT,  # the graceful path, and the one that lets cProfile write
        env=_port443_env(),
        cwd=REPO,
    )


def start_target(
    fx: Fixture, procs: Processes, kind: str, backend_port: int, workers: str = "1"
) -> Target:
    """Start one target ("nginx", "haproxy", "caddy" or "port443" with `workers`), ready."""
    port = free_port()
    if kind == "port443":
        name, label = f"port443-{workers}w", f"port443 {workers}w"
        group = start_port443(
            fx, procs, port=port, upstream_port=backend_port, workers=workers, name=name
        )
    else:
        label, starter = PEER_STARTERS[kind]
        name, group = kind, starter(fx, procs, port, backend_port)
    try:
        wait_until(lambda: _get_status(port) == "200", group, 30, "HTTPS answer")
    except BenchError:
        procs.stop(group)
        raise
    return Target(name=name, label=label, port=port, group=group)


def functional_checks(target: Target, tmp: Path) -> dict[str, str]:
    """What the report lists per target: protocols negotiated, the 100 KB body, resumption."""
    port = target.port
    base = ["curl", "-sk", "--max-time", "5", "--resolve", f"localhost:{port}:127.0.0.1"]
    url = f"https://localhost:{port}"

    def curl(*args: str) -> str:
        out = subprocess.run([*base, *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {
        "h2": curl("--http2", "-o", "/dev/null", "-w", "%{http_version}", f"{url}/"),
        "h1": curl("--http1.1", "-o", "/dev/null", "-w", "%{http_version}", f"{url}/"),
        "100k": curl("-o", "/dev/null", "-w", "%{size_download}", f"{url}/100k"),
        "resumes": "yes" if _resumes(port, tmp / f"{target.name}.session") else "no",
    }


def _resumes(port: int, sess: Path) -> bool:
    """Does a second TLS 1.3 connection resume the first one's session (openssl s_client)?"""
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"]
    base += ["-tls1_3", "-ign_eof"]
    try:
        subprocess.run(
            [*base, "-sess_out", str(sess)], input=req, capture_output=True, timeout=10, check=False
        )
        if not sess.exists():
            return False
        out = subprocess.run(
            [*base, "-sess_in", str(sess)], input=req, capture_output=True, timeout=10, check=False
        )
        return b"\nReused," in out.stdout
    finally:
        sess.unlink(missing_ok=True)
