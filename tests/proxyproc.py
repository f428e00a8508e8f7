"""Run the real proxy as a child process (`python -m proxy run`) on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sites_toml(*sites: tuple[list[str], list[str]]) -> str:
    out = []
    for hosts, upstreams in sites:
        out.append(f"[[sites]]\nhosts = {hosts!r}\nupstreams = {upstreams!r}\n".replace("'", '"'))
    return "\n".join(out)


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    https_port: int
    http_port: int
    certs_dir: Path
    log_path: Path
    admin_port: int | None = None

    @property
    def root_ca(self) -> Path:
        return self.certs_dir / "local" / "root.pem"

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"https://{host}:{self.https_port}{path}"

    def resolve(self, host: str = "localhost") -> str:
        """curl --resolve argument pinning `host` to loopback."""
        return f"{host}:{self.https_port}:127.0.0.1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait without blocking the test's event loop (its backend must keep
        serving while the proxy drains)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise TimeoutError(f"proxy still running after {timeout}s:\n{self.log()}")
            await trio.sleep(0.05)
        return code


def write_config(
    directory: Path,
    body: str,
    *,
    http_port: int,
    https_port: int,
    admin_port: int | None = None,
    issuer: str = "local",
    http3: bool = False,
) -> Path:
    """The admin listener is off unless asked for: its default port is a fixed one."""
    certs = directory / "certs"
    config = directory / "port443.toml"
    admin = f"port = {admin_port}" if admin_port else "enabled = false"
    config.write_text(
        f'log_level = "debug"\n[listen]\naddress = "127.0.0.1"\n'
        f"http = {http_port}\nhttps = {https_port}\nhttp3 = {str(http3).lower()}\n"
        f'[certs]\ndir = "{certs}"\nissuer = "{issuer}"\n[admin]\n{admin}\n' + body
    )
    return config


async def start_proxy(
    directory: Path,
    body: str,
    *,
    http: bool = True,
    admin: bool = False,
    issuer: str = "local",
    ports: tuple[int, int] | None = None,
    module: str = "proxy",
    http3: bool = False,
) -> ProxyProcess:
    """Start the proxy with `body` appended to a base config; wait until HTTPS accepts.

    `ports` = (http, https) instead of free ones (an ACME CA must know where to validate);
    `module` is what `python -m` runs.
    """
    http_port, https_port = ports or (free_port() if http else 0, free_port())
    admin_port = free_port() if admin else None
    config = write_config(
        directory,
        body,
        http_port=http_port,
        https_port=https_port,
        admin_port=admin_port,
        issuer=issuer,
        http3=http3,
    )
    log_path = directory / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "run", "-c", str(config)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proxy = ProxyProcess(process, https_port, http_port, directory / "certs", log_path, admin_port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}:\n{proxy.log()}")
        if "listening for https" in proxy.log():
            return proxy
        await trio.sleep(0.05)
    await proxy.terminate()
    raise RuntimeError(f"proxy did not start:\n{proxy.log()}")


async def run(
    *argv: str, timeout: float = 60, check: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run a real client (curl, openssl, h2load) with a bound on its time."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=check
        )


def curl_args(
    proxy: ProxyProcess, path: str = "/", host: str = "localhost", *extra: str
) -> list[str]:
    return [
        "curl", "-sS", "--max-time", "30", "--cacert", str(proxy.root_ca),
        "--resolve", proxy.resolve(host), *extra, proxy.url(path, host),
    ]  # fmt: skip


RSS_GROWTH_LIMIT_KIB = 64 * 1024  # far below a 200 MiB body: buffering would blow it


async def transfer_with_rss(proxy: ProxyProcess, *curl: str) -> tuple[bytes, int]:
    """Run curl while sampling the proxy's RSS; returns curl's stdout and the peak growth."""
    baseline = proxy.rss_kib()
    peak = baseline
    done = trio.Event()
    out: list[bytes] = []

    async def transfer() -> None:
        result = await run(*curl, timeout=120, check=True)
        out.append(result.stdout)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfer)
        while not done.is_set():
            peak = max(peak, proxy.rss_kib())
            await trio.sleep(0.05)
    return out[0], peak - baseline
