"""IP-address certificates (RFC 8738): Pebble issues one for 127.0.0.1, validated by HTTP-01
or by TLS-ALPN-01 alone (section 6: the validator's SNI is 1.0.0.127.in-addr.arpa) through
the running proxy, and the proxy serves it to a client that sends no SNI."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.backend import Backend
from tests.support.certs import pebble_root, start_acme_proxy
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, sites_toml
from tests.support.run import run

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)

pytestmark = pytest.mark.slow


async def served_without_sni(proxy: ProxyProcess, root: Path) -> x509.Certificate | None:
    """The leaf a handshake without SNI to 127.0.0.1 gets, verified for that address."""
    result = await run(
        "openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https_port}", "-noservername",
        "-verify_ip", "127.0.0.1", "-CAfile", str(root), "-verify_return_error", timeout=15,
    )  # fmt: skip
    pem = PEM.search(result.stdout)
    if result.returncode != 0 or pem is None:
        return None
    return x509.load_pem_x509_certificate(pem[0])


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_ip_address_certificate_is_served_without_sni(
    challenge: str,
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    sites = sites_toml((["127.0.0.1"], [backend.url]))
    proxy = await start_acme_proxy(tmp_path, pebble, sites, challenge, ports=proxy_ports)
    try:
        await proxy.wait_log("site 127.0.0.1: serving certificate")
        cert = await served_without_sni(proxy, pebble_root(pebble, tmp_path))
        assert cert is not None
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        response = await run(
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
            str(pebble_root(pebble, tmp_path)), f"https://127.0.0.1:{proxy.https_port}/",
        )  # fmt: skip
        assert response.returncode == 0, response.stderr
        assert response.stdout.strip() == b"200"
    finally:
        await proxy.terminate()
