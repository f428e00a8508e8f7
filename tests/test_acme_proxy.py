"""ACME in the running proxy, against a real Pebble that validates through the proxy's own
listeners: issuance over HTTP-01 and TLS-ALPN-01, renewal of short-lived certificates
without restart, a CA outage, nonce rejections, a failed validation, and kill -9.

Every client is real: `openssl s_client` for what a fresh handshake is served, curl for
requests, both trusting only Pebble's issuing root.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.certs.store import CertStore
from tests.support.backend import Backend
from tests.support.certs import (
    open_connection,
    pebble_root,
    port443_certs,
    served,
    start_acme_proxy,
    wait_served,
)
from tests.support.curl import curl
from tests.support.net import free_port
from tests.support.openssl import s_client
from tests.support.pebble import Pebble
from tests.support.proxy import sites_toml, start_proxy

pytestmark = pytest.mark.slow


async def test_issuance_via_http01(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """One certificate for both names of the site; another site keeps the local CA."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    sites = sites_toml((["web.example.com", "www.web.example.com"], [backend.url]))
    sites += sites_toml((["intranet.test"], [backend.url])) + 'issuer = "local"\n'
    proxy = await start_acme_proxy(tmp_path, pebble, sites, "http-01", ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        cert = await wait_served(proxy, "www.web.example.com", lambda: root)
        assert (await served(proxy, "web.example.com", root)) == cert
        response = await curl(*proxy.curl_args("/echo", "web.example.com", cafile=root))
        assert json.loads(response.body)["target"] == "/echo"
        assert await served(proxy, "intranet.test", proxy.root_ca) is not None
    finally:
        await proxy.terminate()
    stored = CertStore(proxy.certs_dir).load("web.example.com")
    assert stored is not None and stored.serial == cert.serial_number
    assert stored.meta["issuer"] == "acme" and stored.meta["directory"] == pebble.directory
    assert stored.key_path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in (proxy.certs_dir / ".challenges").rglob("*") if p.is_file()]
    assert "from " + pebble.directory + ", http-01" in proxy.log()


async def test_issuance_via_tls_alpn01_without_port_80(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """TLS-ALPN-01 alone, with the HTTP listener off: the HTTPS port proves control."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    sites = sites_toml((["alpn.example.com"], [backend.url]))
    proxy = await start_acme_proxy(
        tmp_path, pebble, sites, "tls-alpn-01", ports=(0, proxy_ports[1])
    )
    try:
        await wait_served(proxy, "alpn.example.com", lambda: pebble_root(pebble, tmp_path))
    finally:
        await proxy.terminate()
    assert "listening for http " not in proxy.log()
    assert "from " + pebble.directory + ", tls-alpn-01" in proxy.log()


async def test_short_lived_certificate_is_renewed_without_restart(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """Renewed at half its 20 s lifetime; new handshakes get the new certificate at once,
    while a connection opened before keeps its own and keeps working."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1], validity_seconds=20)
    sites = sites_toml((["short.example.com"], [backend.url]))
    proxy = await start_acme_proxy(tmp_path, pebble, sites, ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        first = await wait_served(proxy, "short.example.com", lambda: root)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime.total_seconds() <= 21
        async with await open_connection(proxy, "short.example.com", root) as old_connection:
            renewed = await wait_served(
                proxy,
                "short.example.com",
                lambda: root,
                until=lambda cert: cert.serial_number != first.serial_number,
            )
            assert await old_connection.get("/echo") == 200
            assert old_connection.peer_serial() == first.serial_number
        assert renewed.not_valid_before_utc < first.not_valid_after_utc  # before expiry
        assert proxy.process.poll() is None  # the same process throughout
    finally:
        await proxy.terminate()
    assert f"serving certificate {renewed.serial_number:x}" in proxy.log()


async def test_ca_outage_keeps_the_old_certificate_and_backs_off(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """Pebble goes down before the renewal: quick retries, then backoff (its first step is
    1 s here instead of 1 minute, see tests/support/quick_backoff.py), the old certificate is still
    served, and the renewal succeeds once Pebble is back - a new Pebble that forgot our
    account and has a new root."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1], validity_seconds=20)
    sites = sites_toml((["outage.example.com"], [backend.url]))
    proxy = await start_acme_proxy(
        tmp_path, pebble, sites, ports=proxy_ports, module="tests.support.quick_backoff"
    )
    try:
        old_root = pebble_root(pebble, tmp_path)
        first = await wait_served(proxy, "outage.example.com", lambda: old_root)
        pebble.stop()
        backoff = await proxy.wait_log(re.compile(
            r"site outage.example.com: certificate request 3 failed: .*ConnectionError"
            r".*keeping the current one; retrying in 0:00:01 "
        ))  # fmt: skip
        assert "request 1 failed" in proxy.log() and "request 2 failed" in proxy.log()
        still = await served(proxy, "outage.example.com", old_root)
        assert still is not None and still.serial_number == first.serial_number
        pebble.start()
        new_root = pebble_root(pebble, tmp_path)
        renewed = await wait_served(proxy, "outage.example.com", lambda: new_root)
        assert renewed.serial_number != first.serial_number
    finally:
        await proxy.terminate()
    log = proxy.log()
    assert "registering again" in log[backoff.end() :]


async def test_fallback_ca_after_the_quick_retries(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """The first CA is down: tried, retried, retried with the other challenge type first,
    then the order goes to the fallback CA."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    down = f"https://127.0.0.1:{free_port()}/dir"
    body = (
        f'[acme]\ndirectory = "{down}"\nfallback_directory = "{pebble.directory}"\n'
        f'ca_bundle = "{pebble.ca_bundle}"\n'
    ) + sites_toml((["fallback.example.com"], [backend.url]))
    proxy = await start_proxy(tmp_path, body, issuer="acme", ports=proxy_ports)
    try:
        await wait_served(proxy, "fallback.example.com", lambda: pebble_root(pebble, tmp_path))
    finally:
        await proxy.terminate()
    log = proxy.log()
    assert "request 3 failed" in log and "retrying at the fallback CA in 0:00:00" in log
    assert "request 4 failed" not in log
    stored = CertStore(proxy.certs_dir).load("fallback.example.com")
    assert stored is not None and stored.meta["directory"] == pebble.directory


async def test_nonce_rejections_are_survived(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(
        http_port=proxy_ports[0], tls_port=proxy_ports[1], env={"PEBBLE_WFE_NONCEREJECT": "50"}
    )
    sites = sites_toml((["nonce.example.com"], [backend.url]))
    proxy = await start_acme_proxy(tmp_path, pebble, sites, ports=proxy_ports)
    try:
        await wait_served(proxy, "nonce.example.com", lambda: pebble_root(pebble, tmp_path))
    finally:
        await proxy.terminate()
    assert "badNonce" in proxy.log()
    assert "certificate request 1 failed" not in proxy.log()


async def test_invalid_authorization_is_reported_while_other_sites_serve(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """bad.example.com resolves, for the CA, to an address where nothing listens."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    pebble.resolve("bad.example.com", "127.0.0.2")
    sites = sites_toml((["good.example.com"], [backend.url]), (["bad.example.com"], [backend.url]))
    proxy = await start_acme_proxy(tmp_path, pebble, sites, "http-01", ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        good = await wait_served(proxy, "good.example.com", lambda: root)
        failure = await proxy.wait_log(
            re.compile(r"site bad.example.com: certificate request 1 failed: (bad.example.com: .*)")
        )
        refused = await s_client(proxy.https_port, "-servername", "bad.example.com")
        assert refused.returncode != 0
        assert "unrecognized name" in refused.output
        table = port443_certs(tmp_path / "port443.toml")
    finally:
        await proxy.terminate()
    assert "http-01 validation failed: urn:ietf:params:acme:error:connection" in failure[1]
    assert "127.0.0.2" in failure[1]
    header, good_row, bad_row = table.splitlines()
    assert header.split() == [
        "NAMES", "ISSUER", "NOT", "AFTER", "DAYS", "LEFT", "NEXT", "RENEWAL", "LAST", "ERROR",
    ]  # fmt: skip
    assert good_row.startswith("good.example.com") and "acme" in good_row
    assert good.not_valid_after_utc.strftime("%Y-%m-%d %H:%M") in good_row
    assert bad_row.startswith("bad.example.com") and "none yet" in bad_row
    assert "http-01 validation failed" in bad_row


async def test_kill_9_during_issuance_leaves_a_usable_store(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """Killed as the order starts, as the certificate arrives and once it is served: each
    time the store holds a whole, matching pair or nothing, and the next start goes on
    from there - re-ordering, or serving the stored certificate without a new order."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    sites = sites_toml((["crash.example.com"], [backend.url]))
    store = CertStore(tmp_path / "certs")
    for moment in ("ACME: ordering a certificate", "ACME: issued a certificate", "serving"):
        proxy = await start_acme_proxy(tmp_path, pebble, sites, ports=proxy_ports)
        await proxy.wait_log(moment)
        proxy.process.send_signal(signal.SIGKILL)
        await proxy.wait(5)
        assert "Traceback" not in proxy.log() and "ignoring stored" not in proxy.log()
        left = store.load("crash.example.com")  # None, or a pair whose key matches
        assert not list(store.path("crash.example.com").glob("*.new")), "a torn write stays"
    assert left is not None  # the last kill came after the certificate was stored
    proxy = await start_acme_proxy(tmp_path, pebble, sites, ports=proxy_ports)
    try:
        cert = await wait_served(proxy, "crash.example.com", lambda: pebble_root(pebble, tmp_path))
    finally:
        await proxy.terminate()
    assert cert.serial_number == left.serial
    assert "requesting a certificate" not in proxy.log()
