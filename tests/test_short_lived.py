"""Short-lived certificates (issue 12): Pebble issues 20-second certificates, the running proxy
renews each at half its lifetime, three times in a row, while a client keeps making requests
both on one connection kept open throughout and on new connections: none fails, and the
serial new handshakes get changes three times."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.certs import open_connection, pebble_root, start_acme_proxy, wait_served
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, sites_toml

pytestmark = pytest.mark.slow

HOST = "short.example.com"
LIFETIME = 20  # seconds of Pebble's certificates: renewals every ~10 s
RENEWALS = 3
DEADLINE = 30 + RENEWALS * LIFETIME  # seconds: first issuance, then the renewals with room
PAUSE = 0.5  # seconds between a client's requests


async def new_connection_serial(proxy: ProxyProcess, root: Path) -> int:
    """The serial a fresh verified handshake is served, after one 200 on that connection."""
    async with await open_connection(proxy, HOST, root) as connection:
        return connection.peer_serial()


async def test_three_renewals_in_a_row_drop_no_request(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(
        http_port=proxy_ports[0], tls_port=proxy_ports[1], validity_seconds=LIFETIME
    )
    proxy = await start_acme_proxy(
        tmp_path, pebble, sites_toml(([HOST], [backend.url])), ports=proxy_ports
    )
    try:
        root = pebble_root(pebble, tmp_path)
        first = await wait_served(proxy, HOST, lambda: root)
        assert first.not_valid_after_utc - first.not_valid_before_utc <= timedelta(
            seconds=LIFETIME + 1
        )
        serials = [first.serial_number]
        kept_requests = 0
        with trio.fail_after(DEADLINE):
            async with await open_connection(proxy, HOST, root) as kept:
                while len(serials) <= RENEWALS:
                    assert await kept.get("/echo") == 200  # the kept connection never breaks
                    kept_requests += 1
                    serial = await new_connection_serial(proxy, root)
                    if serial != serials[-1]:
                        serials.append(serial)
                    await trio.sleep(PAUSE)
                assert kept.peer_serial() == first.serial_number  # it keeps its certificate
        assert len(set(serials)) == RENEWALS + 1
        assert kept_requests > RENEWALS * LIFETIME / 2 / (PAUSE + 1)  # busy the whole time
        assert proxy.process.poll() is None  # the same process throughout
    finally:
        await proxy.terminate()
    log = proxy.log()
    for serial in serials[1:]:
        assert f"serving certificate {serial:x}" in log
    assert "certificate request" not in log  # no attempt failed
