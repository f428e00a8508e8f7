"""On-demand TLS in the running proxy against a real Pebble: a name nobody configured gets its
certificate during its first handshake (curl), a refused name gets an alert and is asked
for once within the cache time, and the order rate limit holds (counted at Pebble).

Pebble's DNS (pebble-challtestsrv) resolves every name to 127.0.0.1, so any customer name
validates by HTTP-01 through the proxy's own listener.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.certs.store import CertStore
from tests.support.ask import AskEndpoint
from tests.support.backend import Backend
from tests.support.certs import acme_toml, pebble_root, served, wait_served
from tests.support.curl import curl
from tests.support.openssl import Handshake, s_client
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.workers import start_workers
from tests.test_observability import parse_metrics, sample

pytestmark = pytest.mark.slow

NEW_ORDER = re.compile(r"Added order \"")  # Pebble logs each order it creates (not retries)


@dataclass
class OnDemandRig:
    """What every test here needs: Pebble validating through the proxy's own ports, the ask
    endpoint approving names, the backend behind the on-demand site, Pebble's root as a file."""

    pebble: Pebble
    ask: AskEndpoint
    backend: Backend
    ports: tuple[int, int]  # the proxy's (http, https), where Pebble validates
    tmp_path: Path
    root: Path

    def toml(self, limits: str = "", challenge: str = "http-01") -> str:
        """One site taking any name on demand, approved by `ask`; `limits` go in [acme]."""
        body = acme_toml(self.pebble, challenge) + limits
        return body + (
            f'[[sites]]\non_demand = true\nask = "{self.ask.url}"\n'
            f'upstreams = ["{self.backend.url}"]\n'
        )

    async def start_proxy(self, limits: str = "", challenge: str = "http-01") -> ProxyProcess:
        body = self.toml(limits, challenge)
        return await start_proxy(self.tmp_path, body, issuer="acme", ports=self.ports, admin=True)

    def orders(self) -> int:
        """How many orders Pebble has created (not retries), from its log."""
        log = (self.tmp_path / "pebble-0" / "pebble.log").read_text()
        return len(NEW_ORDER.findall(log))


@pytest.fixture
def on_demand(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> Callable[..., OnDemandRig]:
    """`on_demand(**pebble_options)`: the rig, with a Pebble started with those options."""

    def make(**pebble_options: Any) -> OnDemandRig:
        http, https = proxy_ports
        pebble = start_pebble(http_port=http, tls_port=https, **pebble_options)
        return OnDemandRig(
            pebble=pebble,
            ask=ask,
            backend=backend,
            ports=proxy_ports,
            tmp_path=tmp_path,
            root=pebble_root(pebble, tmp_path),
        )

    return make


async def handshake(proxy: ProxyProcess, name: str, root: Path) -> Handshake:
    """One `openssl s_client` handshake for `name`, verifying against `root`."""
    return await s_client(
        proxy.https_port, "-servername", name, "-CAfile", str(root), "-verify_return_error"
    )


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_an_approved_name_gets_a_certificate_during_its_first_handshake(
    on_demand: Callable[..., OnDemandRig], challenge: str
) -> None:
    """Also by TLS-ALPN-01: the validator's handshake for the name that is waiting for its
    certificate is answered, not held behind the order it belongs to."""
    rig = on_demand()
    rig.ask.approved.add("shop.customer.test")
    proxy = await rig.start_proxy(challenge=challenge)
    try:
        await proxy.wait_ready()  # an on-demand site has no certificate of its own to wait for
        args = proxy.curl_args("/echo", "shop.customer.test", cafile=rig.root)
        async with trio.open_nursery() as nursery:  # two first handshakes at once
            replies = []

            async def get() -> None:
                replies.append(await curl(*args))

            nursery.start_soon(get)
            nursery.start_soon(get)
        assert [json.loads(reply.body)["target"] for reply in replies] == ["/echo"] * 2
        assert (await curl(*args)).status == 200
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert rig.ask.asked == ["shop.customer.test"]
    assert rig.orders() == 1
    stored = CertStore(proxy.certs_dir).load("shop.customer.test")
    assert stored is not None and stored.names == ("shop.customer.test",)
    assert stored.meta["directory"] == rig.pebble.directory
    assert f"from {rig.pebble.directory}, {challenge}" in proxy.log()
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 1
    assert "Traceback" not in proxy.log()


async def test_a_refused_name_gets_an_alert_and_is_asked_for_once(
    on_demand: Callable[..., OnDemandRig],
) -> None:
    rig = on_demand()
    proxy = await rig.start_proxy()
    try:
        for _ in range(3):
            refused = await handshake(proxy, "refused.customer.test", rig.root)
            assert "unrecognized name" in refused.output, refused
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert rig.ask.asked == ["refused.customer.test"]
    assert rig.orders() == 0
    assert sample(metrics, "port443_on_demand_total", outcome="refused") == 1


async def test_the_order_rate_limit_holds(on_demand: Callable[..., OnDemandRig]) -> None:
    """on_demand_rate = 2: of five approved names asked for at once, two are ordered; the
    others get an alert and are not ordered again within the cache time."""
    rig = on_demand()
    names = [f"shop{i}.customer.test" for i in range(5)]
    rig.ask.approved.update(names)
    proxy = await rig.start_proxy("on_demand_rate = 2\n")
    try:
        handshakes: dict[str, Handshake] = {}

        async def first(name: str) -> None:
            handshakes[name] = await handshake(proxy, name, rig.root)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(first, name)
        served = [name for name in names if handshakes[name].certificate() is not None]
        refused = [name for name in names if "unrecognized name" in handshakes[name].output]
        assert len(served) == 2 and sorted(served + refused) == names, handshakes
        for name in refused:  # remembered: no new order
            assert "unrecognized name" in (await handshake(proxy, name, rig.root)).output
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert rig.orders() == 2
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 2
    assert sample(metrics, "port443_on_demand_total", outcome="rate_limited") == 3
    assert sorted(rig.ask.asked) == names


async def test_an_on_demand_certificate_is_renewed_without_the_rate_limit(
    on_demand: Callable[..., OnDemandRig],
) -> None:
    """A 20 s certificate is renewed at half its lifetime by the sites' renewal loop: not
    asked for again, and not held back by on_demand_rate = 1, spent on the first order."""
    rig = on_demand(validity_seconds=20)
    rig.ask.approved.add("short.customer.test")
    proxy = await rig.start_proxy("on_demand_rate = 1\n")
    try:
        first = await served(proxy, "short.customer.test", rig.root)
        assert first is not None
        await wait_served(
            proxy,
            "short.customer.test",
            lambda: rig.root,
            until=lambda cert: cert.serial_number != first.serial_number,
        )
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert rig.ask.asked == ["short.customer.test"]
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 1
    assert sample(metrics, "port443_on_demand_total", outcome="rate_limited") == 0
    assert rig.orders() >= 2


async def test_workers_share_an_on_demand_certificate_through_the_store(
    on_demand: Callable[..., OnDemandRig],
) -> None:
    """The worker that met the name first orders; the other asks once and loads it from the
    store: one order, one certificate, whichever worker a client reaches."""
    rig = on_demand()
    rig.ask.approved.add("shared.customer.test")
    proxy = await start_workers(rig.tmp_path, rig.toml(), issuer="acme", ports=rig.ports)
    try:
        serials = set()
        for _ in range(40):  # until both workers have been asked (the kernel spreads clients)
            cert = await served(proxy, "shared.customer.test", rig.root)
            assert cert is not None
            serials.add(cert.serial_number)
            if len(rig.ask.asked) == 2:
                break
    finally:
        await proxy.terminate()
    assert rig.ask.asked == ["shared.customer.test"] * 2 and len(serials) == 1
    assert rig.orders() == 1
