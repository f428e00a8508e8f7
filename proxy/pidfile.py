"""The pid file that lets `port443 reload` find the running proxy of a configuration.

It lives in the certificate store (`<certs dir>/port443.pid`): the one directory each
instance owns and can write, in a container too.
"""

from __future__ import annotations

import os
from pathlib import Path

from proxy.certs.store import atomic_write
from proxy.config import Config


def pid_path(config: Config) -> Path:
    return config.certs.dir / "port443.pid"


def write_pid(config: Config) -> Path:
    path = pid_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"{os.getpid()}\n".encode("ascii"))
    return path


def remove_pid(config: Config) -> None:
    """Remove the pid file if it is still ours (a newer instance may have replaced it)."""
    path = pid_path(config)
    try:
        if int(path.read_text()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def read_pid(config: Config) -> int:
    """The running proxy's pid; OSError or ValueError if there is none."""
    pid = int(pid_path(config).read_text())
    os.kill(pid, 0)  # raises ProcessLookupError for a stale file
    return pid
