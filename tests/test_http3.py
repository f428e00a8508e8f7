"""HTTP/3 through the real proxy process: aioquic's client over UDP on loopback, in front
of the real HTTP/1.1 backend; and the Alt-Svc advertisement on HTTP/1.1 and HTTP/2."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.backend import Backend
from tests.h3client import h3_client
from tests.proxyproc import ProxyProcess, sites_toml, start_proxy


@pytest.fixture
async def proxy3(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    """The proxy with HTTP/3 on, in front of `backend` for localhost."""
    running = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), http3=True)
    yield running
    await running.terminate()


async def test_get_over_http3(proxy3: ProxyProcess, backend: Backend) -> None:
    authority = f"localhost:{proxy3.https_port}".encode()
    async with h3_client(proxy3.https_port, "localhost", proxy3.root_ca) as client:
        response = await client.request(b"GET", b"/bytes/100000", authority)
    assert response.status == 200
    assert len(response.body) == 100000
    assert backend.requests[-1]["headers"]["via"] == "3 port443"  # type: ignore[index]
