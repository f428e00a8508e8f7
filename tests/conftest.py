"""The fixtures every test file shares, one meaning per name (helpers: tests/support/)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support import slow
from tests.support.ask import AskEndpoint, serve_ask
from tests.support.backend import Backend, serve_backend
from tests.support.net import free_port
from tests.support.otlp import Collector, serve_collector
from tests.support.pebble import Pebble, run_pebble
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy


@pytest.fixture(autouse=True)
def _slow_mark_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """Lets the helpers that start heavy processes check that the test is marked slow."""
    slow.set_current(request.node)
    yield
    slow.set_current(None)


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    """The HTTP/1.1 test backend (tests/support/backend.py), in this test's event loop."""
    started: Backend = await nursery.start(serve_backend, Backend())
    return started


@pytest.fixture
async def ask(nursery: trio.Nursery) -> AskEndpoint:
    """An on-demand TLS ask endpoint (tests/support/ask.py) approving no name until told."""
    started: AskEndpoint = await nursery.start(serve_ask, AskEndpoint())
    return started


@pytest.fixture
async def collector(nursery: trio.Nursery) -> Collector:
    """An OTLP/HTTP traces receiver (tests/support/otlp.py) keeping what it is sent."""
    started: Collector = await nursery.start(serve_collector, Collector())
    return started


@pytest.fixture
async def proxy(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    """The proxy in front of `backend` for host localhost, local CA, redirector on."""
    running = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])))
    yield running
    await running.terminate()


@pytest.fixture
def proxy_ports() -> tuple[int, int]:
    """The proxy's (http, https) ports, chosen before it starts: where Pebble validates."""
    return free_port(), free_port()


@pytest.fixture
def start_pebble(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    """`start_pebble(http_port=..., tls_port=..., **options)`: a Pebble that dies with the test.

    The options are those of `run_pebble`. Pebble validates challenges on `http_port` and
    `tls_port`, so the listeners under test are bound first and their ports passed here.
    """
    numbers = itertools.count()
    with ExitStack() as stack:

        def start(**options: Any) -> Pebble:
            workdir = tmp_path / f"pebble-{next(numbers)}"
            return stack.enter_context(run_pebble(workdir, **options))

        yield start
