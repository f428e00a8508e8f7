"""Fixtures that run a real Pebble ACME server (see tests/pebble.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.pebble import Pebble, run_pebble
from tests.proxyproc import free_port


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


@pytest.fixture
def ports() -> tuple[int, int]:
    """The proxy's (http, https) ports, where Pebble validates."""
    return free_port(), free_port()
