#!/usr/bin/env python3
"""What client-certificate verification costs a TLS 1.3 handshake, in-process (memory BIOs,
one core, ECDSA P-256 everywhere): full handshakes per second for a site without mTLS,
with client_auth = "require" and "request" (its verify callback runs in Python).

    python bench/mtls_handshakes.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `proxy` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.certs.local_ca import LocalCA
from proxy.config import ClientAuth, ClientAuthMode
from proxy.tls import policy
from tests.support.client_pki import ClientCA


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """One full handshake and one byte back (TLS 1.3 verifies the client after Finished)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="localhost")
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    steps: list[Callable[[], object]] = [
        client.do_handshake,
        server.do_handshake,
        lambda: server.write(b"x"),
        lambda: client.read(1),
    ]
    while steps:
        for step in list(steps):
            try:
                step()
                steps.remove(step)
            except ssl.SSLWantReadError:
                pass


def rate(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        handshake(server_ctx, client_ctx)
        count += 1
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per case")
    seconds = parser.parse_args().seconds
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        server_ca = LocalCA(directory)
        chain, key = server_ca.issue(["localhost"])
        (directory / "chain.pem").write_bytes(chain)
        (directory / "key.pem").write_bytes(key)
        clients = ClientCA(directory, "clients")
        alice = clients.issue("alice")
        client_ctx = ssl.create_default_context(cafile=server_ca.root_cert_path)
        client_ctx.load_cert_chain(alice.cert, alice.key)
        client_ctx.options |= ssl.OP_NO_TICKET  # every handshake a full one
        modes: tuple[ClientAuthMode | None, ...] = (None, "require", "request")
        for mode in modes:
            auth = ClientAuth(ca=clients.ca, mode=mode) if mode else None
            server_ctx = policy.server_context(
                directory / "chain.pem", directory / "key.pem", ["http/1.1"], auth
            )
            print(
                f"{mode or 'no mTLS':>8}: {rate(server_ctx, client_ctx, seconds):7.0f} handshakes/s"
            )


if __name__ == "__main__":
    main()
