"""Three real proxy processes share one real redis-server and order from a real Pebble:
one order, the CA's validation answered by an instance that did not order, the same
certificate everywhere, Redis stopped without harm, and a killed lock holder's work
completed by another instance, and a paused one's late write refused.

Pebble validates on one (http, https) port pair: instance "b" owns it. Who orders is made
deterministic with SIGSTOP: while the test itself holds the lock, "b" and "c" start and
are stopped, "a" starts, then the test releases the lock and only "a" is awake to take it.
"""

from __future__ import annotations

import base64
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
from cryptography import x509

from tests.support.certs import acme_toml, pebble_root, wait_served
from tests.support.net import free_port
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy, wait_for_text
from tests.support.redisproc import RedisServer, run_redis
from tests.support.run import run

HOST = "cluster.example.com"
LOCK = f"port443:lock:{HOST}"
KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as server:
        yield server


@asynccontextmanager
async def cluster(
    tmp_path: Path,
    pebble: Pebble,
    server: RedisServer,
    proxy_ports: tuple[int, int],
    lock_ttl: int,
    *,
    keep_stopped: tuple[str, ...] = (),
) -> AsyncIterator[dict[str, ProxyProcess]]:
    """Instances a (the orderer), b (on Pebble's ports) and c, as the module doc says;
    those in `keep_stopped` are still stopped when a has taken the lock."""
    body = (
        acme_toml(pebble, "http-01")
        + f'[storage]\nbackend = "redis"\nurl = "{server.url}"\n'
        + f'encryption_key = "{KEY}"\nlock_ttl = {lock_ttl}\n'
        + sites_toml(([HOST], ["http://127.0.0.1:1"]))
    )
    client = redis.Redis.from_url(server.url)
    client.set(LOCK, "test|0|0", px=60_000)
    proxies: dict[str, ProxyProcess] = {}

    async def start(name: str, instance_ports: tuple[int, int]) -> ProxyProcess:
        (tmp_path / name).mkdir()
        proxy = await start_proxy(
            tmp_path / name, body, issuer="acme", ports=instance_ports, admin=True,
            module="tests.support.quick_backoff",
        )  # fmt: skip
        proxies[name] = proxy
        return proxy

    try:
        for name, instance_ports in (("b", proxy_ports), ("c", (free_port(), free_port()))):
            await (await start(name, instance_ports)).wait_log("another process orders")
            proxies[name].process.send_signal(signal.SIGSTOP)
        a = await start("a", (free_port(), free_port()))
        await a.wait_log("another process orders")
        client.delete(LOCK)
        await a.wait_log(f"holds the renewal lock of {HOST}")
        for name in ("b", "c"):
            if name not in keep_stopped:
                proxies[name].process.send_signal(signal.SIGCONT)
        yield proxies
    finally:
        for proxy in proxies.values():
            proxy.process.send_signal(signal.SIGCONT)
            if proxy.process.poll() is None:
                await proxy.terminate()
        client.close()


def _root(pebble: Pebble, tmp_path: Path) -> Callable[[], Path]:
    return lambda: pebble_root(pebble, tmp_path)


async def _readyz(proxy: ProxyProcess) -> bytes:
    url = f"http://127.0.0.1:{proxy.admin_port}/readyz"
    result = await run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url, timeout=15)
    return result.stdout


async def test_one_order_answered_elsewhere_served_everywhere_and_redis_down(
    tmp_path: Path,
    start_pebble: Callable[..., Pebble],
    proxy_ports: tuple[int, int],
    server: RedisServer,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    root = _root(pebble, tmp_path)
    async with cluster(tmp_path, pebble, server, proxy_ports, lock_ttl=30) as proxies:
        first = await wait_served(proxies["a"], HOST, root)
        for name in ("b", "c"):
            cert = await wait_served(proxies[name], HOST, root)
            assert cert.serial_number == first.serial_number, name
        orders = [proxy.log().count("requesting a certificate") for proxy in proxies.values()]
        assert orders == [0, 0, 1]  # b, c, a: only a ordered ...
        assert "acme-challenge" in proxies["b"].log()  # ... and b answered the CA for it

        server.stop()
        for name, proxy in proxies.items():
            cert2: x509.Certificate = await wait_served(proxy, HOST, root, timeout=10)
            assert cert2.serial_number == first.serial_number, name
            assert await _readyz(proxy) == b"200", name
        await proxies["a"].wait_log("Redis unreachable", timeout=20)
        server.start()  # empty: whoever claims first re-checks, finds no certificate, orders
        await proxies["a"].wait_log("Redis reachable again", timeout=20)


async def test_a_killed_lock_holder_is_replaced_within_the_lock_ttl(
    tmp_path: Path,
    start_pebble: Callable[..., Pebble],
    proxy_ports: tuple[int, int],
    server: RedisServer,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    root = _root(pebble, tmp_path)
    async with cluster(tmp_path, pebble, server, proxy_ports, lock_ttl=3) as proxies:
        a = proxies["a"]
        a.process.kill()  # kill -9, while it orders or right after
        a.process.wait(timeout=10)
        first = await wait_served(proxies["b"], HOST, root, timeout=40)
        cert = await wait_served(proxies["c"], HOST, root, timeout=10)
        assert cert.serial_number == first.serial_number
        logs = proxies["b"].log() + proxies["c"].log()
        assert "taking over its orders and renewals" in logs
    pebble_log = (tmp_path / "pebble-0" / "pebble.log").read_text()
    assert "There are now 2 accounts" not in pebble_log  # the successor used a's account


async def test_a_holder_paused_past_its_lease_cannot_overwrite_its_successor(
    tmp_path: Path,
    start_pebble: Callable[..., Pebble],
    proxy_ports: tuple[int, int],
    server: RedisServer,
) -> None:
    """a orders while b, where Pebble validates, is stopped: a cannot finish (and write)
    before b answers. a is stopped (SIGSTOP) as soon as Pebble tries to validate, b
    resumes and answers; a's 2 s lease runs out, b or c takes the lock and stores a
    certificate; then a resumes (SIGCONT), completes its order, and its late write is
    refused: the successor's certificate stays, in Redis and on every instance."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    root = _root(pebble, tmp_path)
    pebble_log = tmp_path / "pebble-0" / "pebble.log"
    async with cluster(
        tmp_path, pebble, server, proxy_ports, lock_ttl=2, keep_stopped=("b",)
    ) as proxies:
        a, b, c = proxies["a"], proxies["b"], proxies["c"]
        await wait_for_text(pebble_log.read_text, "Attempting to validate w/ HTTP")
        a.process.send_signal(signal.SIGSTOP)
        b.process.send_signal(signal.SIGCONT)
        successor = await wait_served(b, HOST, root, timeout=40)
        assert "taking over its orders and renewals" in b.log() + c.log()

        a.process.send_signal(signal.SIGCONT)
        fenced = r"certificate request 1 failed: .*took the renewal lock; not overwriting"
        await wait_for_text(a.log, re.compile(fenced), timeout=30)
        for proxy in (a, b, c):
            cert = await wait_served(proxy, HOST, root, timeout=15)
            assert cert.serial_number == successor.serial_number
        stored = redis.Redis.from_url(server.url).hget(f"port443:cert:{HOST}", "chain")
        assert stored is not None
        assert x509.load_pem_x509_certificate(stored).serial_number == successor.serial_number
        assert a.log().count("ACME: issued a certificate") == 1  # a did finish its order
