"""Child processes in their own process groups, stopped exactly (and only) by the bench.

Every server is started with `start_new_session`, so its pid is its process-group id: stopping
it signals that group, which reaches workers a master forked and nothing else on the machine.
`Processes` remembers every group it started and stops them all on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType


class BenchError(Exception):
    """A failure that ends the run (or skips one target) with a clear message."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pinned(cpus: str, argv: Sequence[str]) -> list[str]:
    """`argv` restricted to the CPU list `cpus` ("0", "0-3"); children inherit the affinity."""
    return ["taskset", "-c", cpus, *argv]


@dataclass
class Group:
    """A started process group: its leader, log file and how it wants to be stopped."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 8.0) -> None:
        """Signal the group, wait up to `grace` seconds, then SIGKILL what is left of it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace:.0f}s, killing its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # workers that outlived their master
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


class Processes:
    """The groups of one bench session; a context manager that stops all of them on exit."""

    def __init__(self) -> None:
        self._groups: list[Group] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        stop_signal: int = signal.SIGTERM,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Group:
        with log_path.open("wb") as logf:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else dict(env),
                cwd=cwd,
            )
        group = Group(name=name, popen=popen, log_path=log_path, stop_signal=stop_signal)
        self._groups.append(group)
        return group

    def stop(self, group: Group) -> None:
        group.stop()
        with contextlib.suppress(ValueError):
            self._groups.remove(group)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for group in reversed(self._groups):
            group.stop()
        self._groups.clear()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` and `Processes` exit still runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def wait_until(check: Callable[[], bool], group: Group, timeout: float, what: str) -> None:
    """Poll `check` until true; fail early with the log tail if `group` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group.alive():
            raise BenchError(
                f"{group.name} exited with code {group.popen.returncode} before {what}; "
                f"log:\n{group.log_tail()}"
            )
        if check():
            return
        time.sleep(0.2)
    raise BenchError(f"{group.name}: no {what} after {timeout:.0f}s; log:\n{group.log_tail()}")
