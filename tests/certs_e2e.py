"""Helpers for tests of certificates in the real proxy process: start it against an ACME
CA, watch what fresh TLS handshakes are served and what it logs, run `port443 certs`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography import x509

from tests.pebble import Pebble
from tests.proxyproc import ROOT, ProxyProcess, run, start_proxy

WAIT = 30.0  # seconds for an issuance or renewal that is due
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def acme_toml(pebble: Pebble, *challenges: str) -> str:
    return (
        f'[acme]\ndirectory = "{pebble.directory}"\nemail = "admin@example.com"\n'
        f'ca_bundle = "{pebble.ca_bundle}"\nchallenges = {json.dumps(list(challenges))}\n'
    )


async def start_acme_proxy(
    directory: Path,
    pebble: Pebble,
    sites: str,
    *challenges: str,
    ports: tuple[int, int],
    module: str = "proxy",
) -> ProxyProcess:
    body = acme_toml(pebble, *(challenges or ("http-01", "tls-alpn-01"))) + sites
    return await start_proxy(directory, body, issuer="acme", ports=ports, module=module)


def pebble_root(pebble: Pebble, tmp_path: Path) -> Path:
    """Pebble's current issuing root as a file (it changes when Pebble restarts)."""
    path = tmp_path / f"pebble-root-{abs(hash(pebble.root_pem))}.pem"
    path.write_bytes(pebble.root_pem)
    return path


async def served(proxy: ProxyProcess, host: str, root: Path) -> x509.Certificate | None:
    """The leaf a fresh `openssl s_client` handshake for `host` verifies, or None."""
    result = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https_port}",
        "-servername", host, "-verify_hostname", host, "-CAfile", str(root),
        "-verify_return_error", timeout=15,
    )  # fmt: skip
    pem = PEM.search(result.stdout)
    if result.returncode != 0 or pem is None:
        return None
    return x509.load_pem_x509_certificate(pem[0])


async def wait_served(
    proxy: ProxyProcess,
    host: str,
    root: Callable[[], Path],
    until: Callable[[x509.Certificate], bool] = lambda cert: True,
    timeout: float = WAIT,
) -> x509.Certificate:
    """Poll with fresh handshakes until `host` gets a verifying certificate matching `until`."""
    with trio.fail_after(timeout):
        while (cert := await served(proxy, host, root())) is None or not until(cert):
            await trio.sleep(0.2)
    return cert


async def wait_log(
    proxy: ProxyProcess, pattern: str, timeout: float = WAIT, since: int = 0
) -> re.Match[str]:
    """The first match of `pattern` in the log from offset `since` on, once it appears."""
    with trio.fail_after(timeout):
        while (match := re.compile(pattern).search(proxy.log(), since)) is None:
            await trio.sleep(0.05)
    return match


def port443_certs(config: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "certs", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
