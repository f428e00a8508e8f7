"""Certificates with `workers = 2`: one process orders (one ACME order, validated through
whichever worker Pebble reaches), every worker serves the result, and when the process
holding the renewal claim is killed another one takes it over."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from proxy.certs.store import LOCK_DIR
from tests.support.backend import Backend
from tests.support.certs import acme_toml, pebble_root, wait_served
from tests.support.pebble import Pebble
from tests.support.proxy import sites_toml
from tests.support.workers import start_workers, worker_pids

pytestmark = pytest.mark.slow

MANAGER = "proxy.certs.manager:"

_SERVING = re.compile(
    r"\[worker (\d)\] proxy\.certs\.manager: site (\S+): serving certificate (\w+)"
)


def _served_by_worker(log: str, site: str) -> dict[int, set[str]]:
    served: dict[int, set[str]] = {}
    for index, name, serial in _SERVING.findall(log):
        if name == site:
            served.setdefault(int(index), set()).add(serial)
    return served


async def test_one_acme_order_for_two_workers(
    start_pebble: Callable[..., Pebble],
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    body = acme_toml(pebble, "http-01") + sites_toml((["web.example.com"], [backend.url]))
    proxy = await start_workers(tmp_path, body, issuer="acme", ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        cert = await wait_served(proxy, "web.example.com", lambda: root)
        serial = f"{cert.serial_number:x}"
        await proxy.wait_log(f"serving certificate {serial}", count=2)
        log = proxy.log()
        assert log.count("ACME: ordering a certificate") == 1
        assert log.count("requesting a certificate") == 1
        assert log.count("another process orders and renews this certificate") == 1
        assert _served_by_worker(log, "web.example.com") == {1: {serial}, 2: {serial}}
    finally:
        assert await proxy.terminate() == 0


async def test_the_renewal_claim_moves_when_its_holder_dies(
    backend: Backend, tmp_path: Path
) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    lock = tmp_path / "certs" / LOCK_DIR / "localhost"
    try:
        log = proxy.log()
        holder = int(re.findall(r"\[worker (\d)\] [^\n]*requesting a certificate", log)[0])
        follower = 3 - holder
        assert f"[worker {follower}] {MANAGER} site localhost: another process" in log
        assert _claimed(lock)
        subprocess.run(["kill", "-KILL", str(worker_pids(proxy)[holder])], check=True)
        await proxy.wait_log(f"worker {holder} started", count=2)
        await proxy.wait_ready()
        with trio.fail_after(10):  # the follower's next poll, or the successor, claims it
            while not _claimed(lock):
                await trio.sleep(0.1)
        log = proxy.log()
        took_over = f"[worker {follower}] {MANAGER} site localhost: taking over" in log
        successor_follows = log.count(f"[worker {holder}] {MANAGER} site localhost: another") == 1
        # exactly one holds the claim: the follower took over and the successor follows, or
        # the successor claimed it first and the follower still follows
        assert took_over == successor_follows
        assert log.count("requesting a certificate") == 1  # the stored one is still good
    finally:
        assert await proxy.terminate() == 0


def _claimed(lock: Path) -> bool:
    """Whether a live process holds the renewal claim (this process never keeps it)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
