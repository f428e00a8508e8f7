"""Child processes for tests: any real client (curl, openssl, h2load, nghttp) with a bound on
its time, and one-shot port443 commands (`check`, `reload`, `certs`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from tests.support.net import listens

ROOT = Path(__file__).resolve().parents[2]  # the checkout: `python -m proxy` runs from here


async def run(
    *argv: str, timeout: float = 60, check: bool = False, **options: Any
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` to completion without blocking the test's event loop (its backends keep
    serving); `options` go to trio.run_process (stdin, env, ...)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=check, **options
        )


async def wait_listening(
    process: subprocess.Popen[bytes], *ports: int, timeout: float = 20
) -> bool:
    """Until `process` itself listens on each of `ports` (True), or has exited or run out of
    time (False). Readiness from the sockets, not from the wording of a log line."""
    deadline = trio.current_time() + timeout
    while process.poll() is None and trio.current_time() < deadline:
        if all(listens(process.pid, port) for port in ports):
            return True
        await trio.sleep(0.05)
    return False


def port443(*args: str) -> subprocess.CompletedProcess[str]:
    """A one-shot `python -m proxy ARGS` (no server: nothing to serve meanwhile)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
