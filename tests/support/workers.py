"""Helpers for tests of `[server] workers = N`: start an instance, find its worker pids, and
tell which worker process accepted a given client connection."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import trio

from tests.support.net import accepted_inode, socket_inodes
from tests.support.proxy import ProxyProcess, start_proxy

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


async def start_workers(
    directory: Path, body: str, workers: int = 2, **options: object
) -> ProxyProcess:
    """An instance of `workers` workers, returned once /readyz says every one serves."""
    proxy = await start_proxy(
        directory, f"[server]\nworkers = {workers}\n" + body, admin=True, **options
    )
    await proxy.wait_ready()
    return proxy


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in _STARTED.findall(proxy.log())}


async def serving_pid(proxy: ProxyProcess, client: socket.socket, pids: set[int]) -> int:
    """Which of `pids` accepted `client`'s connection to the HTTPS port."""
    client_port = client.getsockname()[1]
    with trio.fail_after(10):
        while True:
            inode = accepted_inode(proxy.https_port, client_port)
            if inode is not None:
                owners = [pid for pid in pids if inode in socket_inodes(pid)]
                if owners:
                    return owners[0]
            await trio.sleep(0.02)
