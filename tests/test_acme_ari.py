"""ACME Renewal Information (RFC 9773) and profiles, through the real proxy process.

Pebble 2.4 has no ARI and no profiles, so the proxy talks to `tests/support/ari_double.py`: a test
double in front of a real Pebble that adds renewalInfo (answering with responses shaped
like those recorded from Let's Encrypt, with a window the test picks) and profiles to the
directory, and forwards everything else to Pebble, which still validates and issues.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from proxy.certs.renewal import ari_cert_id
from proxy.certs.store import CertStore
from tests.support.ari_double import AriDouble
from tests.support.backend import Backend
from tests.support.certs import pebble_root, wait_served
from tests.support.pebble import Pebble
from tests.support.proxy import sites_toml, start_proxy

pytestmark = pytest.mark.slow


async def test_ari_window_decides_the_renewal_and_the_order_names_what_it_replaces(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
    nursery: trio.Nursery,
) -> None:
    """A 60 s certificate would be renewed after 30 s; the CA's window, 3-5 s after
    issuance, brings that forward (as after a revocation decision). The renewal order
    carries `replaces` with the old certificate's CertID and the sticky profile."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1], validity_seconds=60)
    windows: dict[str, tuple[datetime, datetime]] = {}

    def window(cert_id: str) -> tuple[datetime, datetime]:
        now = datetime.now(UTC).replace(microsecond=0)  # RFC 3339 in whole seconds
        if not windows:  # the first certificate: renew it soon
            windows[cert_id] = (now + timedelta(seconds=3), now + timedelta(seconds=5))
        return windows.get(cert_id, (now + timedelta(hours=1), now + timedelta(hours=2)))

    double = AriDouble(pebble, window)
    await nursery.start(double.serve)
    body = (
        f'[acme]\ndirectory = "{double.directory}"\nca_bundle = "{pebble.ca_bundle}"\n'
        'profile = "shortlived"\n' + sites_toml((["ari.example.com"], [backend.url]))
    )
    proxy = await start_proxy(tmp_path, body, issuer="acme", ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        first = await wait_served(proxy, "ari.example.com", lambda: root)
        # Under load a first order may fail and be placed again: every order placed
        # before the first certificate was served is an initial one.
        initial_orders = len(double.new_orders)
        planned = await proxy.wait_log(
            re.compile(
                rf"certificate {first.serial_number:x} .* renewal at (.+) \(ARI window (.+) to"
            )
        )
        renewed = await wait_served(
            proxy,
            "ari.example.com",
            lambda: root,
            until=lambda cert: cert.serial_number != first.serial_number,
            timeout=15,
        )
    finally:
        await proxy.terminate()
    at, logged_start = (datetime.fromisoformat(text) for text in planned.groups())
    start, end = windows[ari_cert_id(first)]
    assert logged_start == start
    assert start <= at <= end
    assert renewed.not_valid_before_utc < first.not_valid_before_utc + timedelta(seconds=15)
    assert double.renewal_info_requests[:2] == [ari_cert_id(first), ari_cert_id(renewed)]
    # Under load the renewed certificate may itself come up for renewal before the proxy
    # stops: the order right after the initial ones is the renewal this test is about.
    orders = double.new_orders
    renewal_order = orders[initial_orders]
    assert all(order["profile"] == "shortlived" for order in orders[: initial_orders + 1])
    assert not any("replaces" in order for order in orders[:initial_orders]), proxy.log()
    assert renewal_order.get("replaces") == ari_cert_id(first), proxy.log()
    stored = CertStore(proxy.certs_dir).load("ari.example.com")
    assert stored is not None and stored.meta["profile"] == "shortlived"
    assert stored.serial == renewed.serial_number
