"""A real Pebble ACME server on loopback, with pebble-challtestsrv as its DNS.

Every name resolves to 127.0.0.1 (and has no AAAA record, else Pebble would validate
against ::1), and Pebble validates HTTP-01 and TLS-ALPN-01 on the ports we give it, where
the code under test listens. Pebble's own HTTPS certificate is minted here, and its
issuing root, regenerated at every start, is fetched from the management `/roots/0`.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from tests.support.net import free_dns_port, free_ports
from tests.support.slow import require_slow

START_TIMEOUT = 15.0


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    ca_bundle: Path  # trust root for Pebble's own HTTPS (not the issuing root)
    tls_cert: Path  # Pebble's own HTTPS certificate and key, valid for 127.0.0.1
    tls_key: Path
    root_pem: bytes  # the root that issued certificates chain to (new at every start)
    http_port: int  # where Pebble sends HTTP-01 validation requests
    tls_port: int  # where Pebble sends TLS-ALPN-01 validation handshakes
    dns_management: str  # pebble-challtestsrv's management URL
    _process: _Process = field(repr=False)
    _roots_url: str = field(repr=False)

    def stop(self) -> None:
        """Take the CA down (it forgets every account and order, as after a crash)."""
        self._process.stop()

    def start(self) -> None:
        """Bring a stopped CA back on the same ports; it has a new issuing root."""
        self._process.start()
        self.root_pem = self._ready(time.monotonic() + START_TIMEOUT)

    def resolve(self, host: str, address: str) -> None:
        """Make the CA's DNS answer `address` for `host` (an A record)."""
        body = json.dumps({"host": host, "addresses": [address]}).encode()
        urllib.request.urlopen(f"{self.dns_management}/add-a", body, timeout=5).close()

    def _ready(self, deadline: float) -> bytes:
        """Wait for the directory; the issuing root."""
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        _get(self._process, self.directory, context, deadline)
        return _get(self._process, self._roots_url, context, deadline)


@contextmanager
def run_pebble(
    workdir: Path,
    *,
    http_port: int,
    tls_port: int,
    env: Mapping[str, str] | None = None,
    validity_seconds: int | None = None,
    eab_keys: Mapping[str, str] | None = None,
    dns_server: str | None = None,
) -> Iterator[Pebble]:
    """Run Pebble until the block ends; `env` adds PEBBLE_* settings (e.g. nonce rejection).

    `dns_server` ("IP:port") is where Pebble resolves instead of pebble-challtestsrv: a real
    authoritative server for DNS-01 (`resolve` then has no effect on validation).
    """
    require_slow("starts Pebble")
    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_bundle, cert, key = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    ca.cert_pem.write_to_path(str(ca_bundle))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))

    # Chosen together: Pebble, its management port and the DNS server must not collide.
    acme_port, management_port, dns_management_port = ports = free_ports(3)
    dns_port = free_dns_port(besides=tuple(ports))
    config: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": bool(eab_keys),
    }
    if eab_keys:
        config["externalAccountMACKeys"] = dict(eab_keys)
    if validity_seconds is not None:
        config["certificateValidityPeriod"] = validity_seconds
    config_path = workdir / "pebble-config.json"
    config_path.write_text(json.dumps({"pebble": config}, indent=2))

    dns = [
        "pebble-challtestsrv",
        *("-http01", "", "-https01", "", "-tlsalpn01", ""),
        *("-dns01", f"127.0.0.1:{dns_port}"),
        *("-management", f"127.0.0.1:{dns_management_port}"),
        *("-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""),
    ]
    resolver = dns_server or f"127.0.0.1:{dns_port}"
    pebble = ["pebble", "-config", str(config_path), "-dnsserver", resolver]
    pebble_env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", **(env or {})}
    dns_proc = _Process(dns, workdir / "challtestsrv.log", os.environ)
    pebble_proc = _Process(pebble, workdir / "pebble.log", pebble_env)
    handle = Pebble(
        directory=f"https://127.0.0.1:{acme_port}/dir",
        ca_bundle=ca_bundle,
        tls_cert=cert,
        tls_key=key,
        root_pem=b"",
        http_port=http_port,
        tls_port=tls_port,
        dns_management=f"http://127.0.0.1:{dns_management_port}",
        _process=pebble_proc,
        _roots_url=f"https://127.0.0.1:{management_port}/roots/0",
    )
    with ExitStack() as stack:
        stack.callback(dns_proc.stop)
        stack.callback(pebble_proc.stop)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            dns_proc.start()
            _wait_tcp(dns_proc, dns_management_port, deadline)
            pebble_proc.start()
            handle.root_pem = handle._ready(deadline)
        except RuntimeError as exc:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in workdir.glob("*.log"))
            raise RuntimeError(f"{exc}\n{logs}") from None
        yield handle


class _Process:
    """A child process that can be stopped and started again, appending to one log."""

    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.argv = argv
        self._log_path = log_path
        self._env = dict(env)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self._env
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def exit_status(self) -> int | None:
        """None while running."""
        return self._proc.poll() if self._proc is not None else -1


def _wait_tcp(proc: _Process, port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            _check_alive(proc, deadline)


def _get(proc: _Process, url: str, context: ssl.SSLContext, deadline: float) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                return bytes(response.read())
        except OSError:
            _check_alive(proc, deadline)


def _check_alive(proc: _Process, deadline: float) -> None:
    if proc.exit_status() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"{proc.argv[0]} did not start (exit status {proc.exit_status()})")
    time.sleep(0.05)
