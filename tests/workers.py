"""Helpers for tests of `[server] workers = N`: start an instance, find its worker pids, and
tell which worker process accepted a given client connection."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import trio

from tests.proxyproc import ProxyProcess, run, start_proxy

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


async def start_workers(
    directory: Path, body: str, workers: int = 2, **options: object
) -> ProxyProcess:
    """An instance of `workers` workers, returned once /readyz says every one serves."""
    proxy = await start_proxy(
        directory, f"[server]\nworkers = {workers}\n" + body, admin=True, **options
    )
    await wait_ready(proxy)
    return proxy


async def readyz(proxy: ProxyProcess) -> tuple[int, str]:
    result = await run(
        "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}",
        f"http://127.0.0.1:{proxy.admin_port}/readyz",
    )  # fmt: skip
    body, _, code = result.stdout.decode().rpartition("\n")
    return int(code or 0), body.strip()


async def wait_ready(proxy: ProxyProcess, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while (await readyz(proxy))[0] != 200:
            if proxy.process.poll() is not None:
                raise RuntimeError(f"supervisor exited:\n{proxy.log()}")
            await trio.sleep(0.1)


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Worker index -> pid of its latest process, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in _STARTED.findall(proxy.log())}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _accepted_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the loopback connection to `client_port`."""
    wanted = (f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}")
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            return fields[9]
    return None


async def serving_pid(proxy: ProxyProcess, client: socket.socket, pids: set[int]) -> int:
    """Which of `pids` accepted `client`'s connection to the HTTPS port."""
    client_port = client.getsockname()[1]
    with trio.fail_after(10):
        while True:
            inode = _accepted_inode(proxy.https_port, client_port)
            if inode is not None:
                owners = [pid for pid in pids if inode in _socket_inodes(pid)]
                if owners:
                    return owners[0]
            await trio.sleep(0.02)


async def wait_log_count(proxy: ProxyProcess, text: str, count: int, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while proxy.log().count(text) < count:
            await trio.sleep(0.05)
