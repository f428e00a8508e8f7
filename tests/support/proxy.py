"""Run the real proxy as a child process (`python -m proxy run`) on free loopback ports, and
watch it from outside: its log, its admin port, its memory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.support.curl import Reply, curl
from tests.support.net import free_ports
from tests.support.run import ROOT, wait_listening
from tests.support.slow import require_slow

START_TIMEOUT = 20.0
LOG_TIMEOUT = 30.0


def sites_toml(*sites: tuple[list[str], list[str]]) -> str:
    """`[[sites]]` tables from (hosts, upstreams) pairs; keys for the last site may follow."""
    out = []
    for hosts, upstreams in sites:
        out.append(f"[[sites]]\nhosts = {hosts!r}\nupstreams = {upstreams!r}\n".replace("'", '"'))
    return "\n".join(out)


async def wait_for_text(
    read: Callable[[], str],
    pattern: str | re.Pattern[str],
    *,
    count: int = 1,
    since: int = 0,
    timeout: float = LOG_TIMEOUT,
    alive: Callable[[], bool] = lambda: True,
) -> re.Match[str]:
    """The `count`th match of `pattern` (a literal string, or a compiled regex) in `read()`
    from offset `since` on, once it appears; fails early with the text if `alive()` turns
    false first."""
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
    deadline = trio.current_time() + timeout
    while True:
        text = read()
        matches = list(regex.finditer(text, since))
        if len(matches) >= count:
            return matches[count - 1]
        if not alive():
            raise AssertionError(f"exited before {count} x {regex.pattern!r}:\n{text}")
        if trio.current_time() > deadline:
            raise AssertionError(f"no {count} x {regex.pattern!r} after {timeout}s:\n{text}")
        await trio.sleep(0.05)


async def wait_ready(
    admin_port: int, *, alive: Callable[[], bool], log: Callable[[], str], timeout: float = 30
) -> None:
    """Until /readyz on `admin_port` answers 200; fails with `log()` if `alive()` turns false
    or time runs out."""
    deadline = trio.current_time() + timeout
    while (await curl(f"http://127.0.0.1:{admin_port}/readyz", check=False)).status != 200:
        if not alive():
            raise AssertionError(f"exited before it was ready:\n{log()}")
        if trio.current_time() > deadline:
            raise AssertionError(f"not ready after {timeout}s:\n{log()}")
        await trio.sleep(0.1)


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    https_port: int
    http_port: int  # 0: no plain-HTTP listener
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

    def curl_args(
        self, path: str = "/", host: str = "localhost", cafile: Path | None = None
    ) -> list[str]:
        """curl arguments for `path` on `host` through this proxy, trusting its local CA
        (or `cafile`)."""
        return [
            "--cacert", str(cafile or self.root_ca), "--resolve", self.resolve(host),
            self.url(path, host),
        ]  # fmt: skip

    def admin_url(self, path: str) -> str:
        assert self.admin_port, "started without admin=True"
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def admin(self, path: str, *extra: str) -> Reply:
        """One request to the admin port, whatever its status."""
        return await curl(*extra, self.admin_url(path), check=False)

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until the admin port's /readyz answers 200."""
        assert self.admin_port, "started without admin=True"
        await wait_ready(
            self.admin_port,
            alive=lambda: self.process.poll() is None,
            log=self.log,
            timeout=timeout,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(
        self,
        pattern: str | re.Pattern[str],
        *,
        count: int = 1,
        since: int = 0,
        timeout: float = LOG_TIMEOUT,
    ) -> re.Match[str]:
        """The `count`th match of `pattern` in the log (see `wait_for_text`)."""
        return await wait_for_text(
            self.log,
            pattern,
            count=count,
            since=since,
            timeout=timeout,
            alive=lambda: self.process.poll() is None,
        )

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
    listen: str = "",
) -> Path:
    """The admin listener is off unless asked for: its default port is a fixed one.
    `listen`: more lines of the [listen] table."""
    certs = directory / "certs"
    config = directory / "port443.toml"
    admin = f"port = {admin_port}" if admin_port else "enabled = false"
    config.write_text(
        f'log_level = "debug"\n[listen]\naddress = "127.0.0.1"\n'
        f"http = {http_port}\nhttps = {https_port}\nhttp3 = {str(http3).lower()}\n{listen}\n"
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
    listen: str = "",
) -> ProxyProcess:
    """Start the proxy with `body` appended to a base config; return once the process itself
    listens on each of its ports (a connect could reach another process sharing a port with
    SO_REUSEPORT).

    `ports` = (http, https) instead of free ones (an ACME CA must know where to validate);
    `module` is what `python -m` runs; `http3` also serves HTTP/3 on the HTTPS port's UDP;
    `listen`: more lines of the [listen] table.
    """
    require_slow("starts a proxy process")
    # Chosen together: ports picked one at a time may come back the same (admin = https).
    fresh = free_ports(3, besides=ports or ())
    http_port, https_port = ports or (fresh[0] if http else 0, fresh[1])
    admin_port = fresh[2] if admin else None
    config = write_config(
        directory,
        body,
        http_port=http_port,
        https_port=https_port,
        admin_port=admin_port,
        listen=listen,
        issuer=issuer,
        http3=http3,
    )
    return await launch_proxy(
        directory,
        ["-m", module, "run", "-c", str(config)],
        http_port=http_port,
        https_port=https_port,
        admin_port=admin_port,
    )


async def launch_proxy(
    directory: Path,
    argv: list[str],
    *,
    http_port: int,
    https_port: int,
    admin_port: int | None = None,
) -> ProxyProcess:
    """Run `python ARGV` (a proxy configured to serve these ports, certificates under
    `directory`/certs, log in `directory`/proxy.log) until it listens on each port."""
    require_slow("starts a proxy process")
    log_path = directory / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proxy = ProxyProcess(
        process=process,
        https_port=https_port,
        http_port=http_port,
        certs_dir=directory / "certs",
        log_path=log_path,
        admin_port=admin_port,
    )
    listening = [port for port in (http_port, https_port, admin_port) if port]
    if await wait_listening(process, *listening, timeout=START_TIMEOUT):
        return proxy
    if process.poll() is not None:
        raise RuntimeError(f"proxy exited with {process.returncode}:\n{proxy.log()}")
    await proxy.terminate()
    raise RuntimeError(f"proxy did not start:\n{proxy.log()}")


RSS_GROWTH_LIMIT_KIB = 64 * 1024  # far below a 200 MiB body: buffering would blow it


async def curl_with_rss(proxy: ProxyProcess, *args: str) -> tuple[Reply, int]:
    """curl ARGS while sampling the proxy's RSS; its reply and the peak growth in KiB."""
    baseline = proxy.rss_kib()
    peak = baseline
    replies: list[Reply] = []

    async def transfer() -> None:
        replies.append(await curl(*args))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfer)
        while not replies:
            peak = max(peak, proxy.rss_kib())
            await trio.sleep(0.05)
    return replies[0], peak - baseline
