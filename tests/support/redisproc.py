"""A real `redis-server` per test: a free loopback port, a temporary directory, no
persistence, stopped (and restartable, on the same port) by the test itself. Also a
replica and a Sentinel (`redis-server --sentinel`, what Debian's redis-sentinel runs)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port

START_TIMEOUT = 10.0


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    config: Path | None = None  # a config file first on the command line (Sentinel's)
    options: tuple[str, ...] = ()  # more command-line options: --replicaof, --sentinel

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        head = [] if self.config is None else [str(self.config)]
        self.process = subprocess.Popen(
            ["redis-server", *head, "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", str(self.directory), *self.options],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def run_redis(directory: Path, *options: str, config: Path | None = None) -> Iterator[RedisServer]:
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port=free_port(), directory=directory, config=config, options=options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def run_replica(directory: Path, master: RedisServer) -> Iterator[RedisServer]:
    with run_redis(directory, "--replicaof", "127.0.0.1", str(master.port)) as replica:
        yield replica


@contextmanager
def run_sentinel(directory: Path, master: RedisServer, name: str) -> Iterator[RedisServer]:
    """A Sentinel watching `master` as `name`, deciding alone (quorum 1), quick to fail over."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"  # Sentinel rewrites it: its own file
    config.write_text(
        f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {name} 1000\n"
        f"sentinel failover-timeout {name} 5000\n"
    )
    with run_redis(directory, "--sentinel", config=config) as sentinel:
        yield sentinel
