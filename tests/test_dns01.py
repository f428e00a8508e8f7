"""DNS-01 with real servers: Pebble validates by asking a real Knot DNS on loopback, to which
port443 adds and from which it removes the TXT records by RFC 2136 with TSIG.

A wildcard certificate is issued to the running proxy and served for two subdomains and
the apex (openssl s_client, curl); the record is gone afterwards, also after a failed
validation, and the TSIG secret never reaches the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.certs.acme import AcmeClient, AcmeError
from proxy.config import DnsConfig
from tests.support.backend import Backend
from tests.support.certs import pebble_root, port443_certs, served, start_acme_proxy, wait_served
from tests.support.knot import KEY_NAME, Knot, run_knot
from tests.support.pebble import Pebble
from tests.support.proxy import sites_toml
from tests.support.run import run

CHALLENGE_NAME = "_acme-challenge.example.test"


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[Knot]:
    with run_knot(tmp_path / "knot") as server:
        yield server


pytestmark = pytest.mark.slow


async def test_wildcard_certificate_via_dns01_is_served_for_subdomains(
    start_pebble: Callable[..., Pebble],
    knot: Knot,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1], dns_server=knot.server)
    sites = sites_toml((["*.example.test", "example.test"], [backend.url]))
    sites += 'challenge = "dns-01"\n'
    proxy = await start_acme_proxy(tmp_path, pebble, knot.dns_toml() + sites, ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        cert = await wait_served(proxy, "a.example.test", lambda: root)
        assert await served(proxy, "b.example.test", root) == cert
        assert await served(proxy, "example.test", root) == cert
        assert await served(proxy, "a.b.example.test", root) is None  # one label only
        response = await run(
            "curl", "-sS", "--cacert", str(root), "--resolve", proxy.resolve("b.example.test"),
            proxy.url("/echo", "b.example.test"),
        )  # fmt: skip
        assert response.returncode == 0, response.stderr
        assert json.loads(response.stdout)["target"] == "/echo"
        table = port443_certs(tmp_path / "port443.toml")
        assert "*.example.test" in table and "acme" in table
    finally:
        await proxy.terminate()
    assert knot.txt(CHALLENGE_NAME) == set()  # removed once validated
    log = proxy.log()
    assert "DNS-01: added TXT _acme-challenge.example.test." in log
    assert "DNS-01: removed TXT _acme-challenge.example.test." in log
    assert knot.tsig_secret not in log


async def test_records_are_removed_after_a_failed_validation(
    start_pebble: Callable[..., Pebble], knot: Knot, tmp_path: Path
) -> None:
    """Pebble resolves through pebble-challtestsrv here, which never sees our record:
    validation fails, and the record is removed all the same."""
    pebble = start_pebble(http_port=1, tls_port=1)
    dns = DnsConfig(
        server=("127.0.0.1", knot.port),
        tsig_key_name=KEY_NAME,
        tsig_secret=knot.tsig_secret,
        propagation_servers=(("127.0.0.1", knot.port),),
    )
    client = AcmeClient(tmp_path / "certs", pebble.directory, ca_bundle=pebble.ca_bundle, dns=dns)
    with pytest.raises(AcmeError) as failure:
        await client.issue(["*.example.test"], challenges=("dns-01",))
    assert "dns-01 validation failed" in str(failure.value)
    assert knot.txt(CHALLENGE_NAME) == set()
