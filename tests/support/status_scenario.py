"""A running port443 worth looking at: two sites, one whose upstream is down (its requests
end in 502) and one whose ACME certificate cannot be ordered (the directory is a closed
port on loopback). Shared by the status page's JSON tests and its browser test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from tests.support.backend import Backend
from tests.support.net import free_port
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.run import run

DOWN_REQUESTS = 3


def scenario_toml(backend: Backend, dead_port: int) -> str:
    return (
        f'[acme]\ndirectory = "https://127.0.0.1:{free_port()}/directory"\n'
        f'[[sites]]\nhosts = ["localhost"]\nupstreams = ["http://127.0.0.1:{dead_port}"]\n'
        f'[[sites]]\nhosts = ["acme.test"]\nupstreams = ["{backend.url}"]\nissuer = "acme"\n'
    )


async def admin_get(proxy: ProxyProcess, path: str, *curl: str) -> tuple[int, bytes]:
    result = await run(
        "curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *curl,
        f"http://127.0.0.1:{proxy.admin_port}{path}",
    )  # fmt: skip
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code or 0), body


async def status_json(proxy: ProxyProcess) -> dict[str, Any]:
    code, body = await admin_get(proxy, "/status.json")
    assert code == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


async def start_scenario(directory: Path, backend: Backend, body: str = "") -> ProxyProcess:
    """The proxy once its 502s are counted and the failed order is on record."""
    proxy = await start_proxy(directory, body + scenario_toml(backend, free_port()), admin=True)
    try:
        for _ in range(DOWN_REQUESTS):
            await run(
                "curl", "-sS", "--cacert", str(proxy.root_ca), "--resolve", proxy.resolve(),
                proxy.url("/down?token=secret-in-query"), check=True,
            )  # fmt: skip
        with trio.fail_after(20):
            while not (await status_json(proxy))["certificates"][1]["last_error"]:
                await trio.sleep(0.2)
    except BaseException:
        await proxy.terminate()
        raise
    return proxy
