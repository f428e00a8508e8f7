"""The `slow` mark, kept honest: a helper that starts a heavy child process (the proxy, a
port443 command, Pebble, a container) fails a test that is not marked slow, so that
`pytest -m "not slow"` stays the fast in-process subset."""

from __future__ import annotations

import pytest

_current: pytest.Item | None = None


def set_current(item: pytest.Item | None) -> None:
    """Called by the autouse fixture in tests/conftest.py around every test."""
    global _current
    _current = item


def require_slow(what: str) -> None:
    if _current is not None and _current.get_closest_marker("slow") is None:
        raise AssertionError(f"{_current.nodeid} {what}: mark it @pytest.mark.slow")
