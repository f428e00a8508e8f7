from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.backend import Backend, serve_backend
from tests.proxyproc import ProxyProcess, sites_toml, start_proxy

pytest_plugins = ["tests.conftest_pebble"]


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    started: Backend = await nursery.start(serve_backend, Backend())
    return started


@pytest.fixture
async def proxy(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    """The proxy in front of `backend` for host localhost, local CA, redirector on."""
    running = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])))
    yield running
    await running.terminate()
