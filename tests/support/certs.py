"""Helpers for tests of certificates in the real proxy process: start it against an ACME
CA, watch what fresh TLS handshakes are served, run `port443 certs`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h11
import trio
from cryptography import x509

from tests.support.openssl import s_client
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.run import port443
from tests.support.tls import tls_stream

WAIT = 30.0  # seconds for an issuance or renewal that is due


def acme_toml(pebble: Pebble, *challenges: str) -> str:
    return (
        f'[acme]\ndirectory = "{pebble.directory}"\nemail = "admin@example.com"\n'
        f'ca_bundle = "{pebble.ca_bundle}"\nchallenges = {json.dumps(list(challenges))}\n'
    )


async def start_acme_proxy(
    directory: Path,
    pebble: Pebble,
    sites: str,
    *challenges: str,
    ports: tuple[int, int],
    module: str = "proxy",
) -> ProxyProcess:
    body = acme_toml(pebble, *(challenges or ("http-01", "tls-alpn-01"))) + sites
    return await start_proxy(directory, body, issuer="acme", ports=ports, module=module)


def pebble_root(pebble: Pebble, tmp_path: Path) -> Path:
    """Pebble's current issuing root as a file (it changes when Pebble restarts)."""
    path = tmp_path / f"pebble-root-{abs(hash(pebble.root_pem))}.pem"
    path.write_bytes(pebble.root_pem)
    return path


async def served(proxy: ProxyProcess, host: str, root: Path) -> x509.Certificate | None:
    """The leaf a fresh `openssl s_client` handshake for `host` verifies, or None."""
    handshake = await s_client(
        proxy.https_port, "-servername", host, "-verify_hostname", host, "-CAfile", str(root),
        "-verify_return_error", timeout=15,
    )  # fmt: skip
    return handshake.certificate()


async def wait_served(
    proxy: ProxyProcess,
    host: str,
    root: Callable[[], Path],
    until: Callable[[x509.Certificate], bool] = lambda cert: True,
    timeout: float = WAIT,
) -> x509.Certificate:
    """Poll with fresh handshakes until `host` gets a verifying certificate matching `until`."""
    with trio.fail_after(timeout):
        while (cert := await served(proxy, host, root())) is None or not until(cert):
            await trio.sleep(0.2)
    return cert


def port443_certs(config: Path) -> str:
    result = port443("certs", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return result.stdout


class KeptConnection:
    """One kept-alive HTTPS connection, for requests before and after a certificate swap."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], host: str) -> None:
        self._stream = stream
        self._host = host
        self._h11 = h11.Connection(h11.CLIENT)

    async def get(self, target: str) -> int:
        request = h11.Request(method="GET", target=target, headers=[("Host", self._host)])
        await self._stream.send_all(
            (self._h11.send(request) or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        )
        status = 0
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(bytes(await self._stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self._h11.start_next_cycle()
                return status

    def peer_serial(self) -> int:
        der = self._stream.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    async def __aenter__(self) -> KeptConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.aclose()


async def open_connection(proxy: ProxyProcess, host: str, root: Path) -> KeptConnection:
    """A kept-alive connection to `host` trusting `root`, its first GET /echo answered 200."""
    stream = await tls_stream(proxy, host=host, cafile=root)
    connection = KeptConnection(stream, host)
    assert await connection.get("/echo") == 200
    return connection
