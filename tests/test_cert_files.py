"""issuer = "files": the running proxy watches the configured pair and swaps in a new one
once it validates; a bad pair is refused with a clear log line and the old one stays."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from proxy.certs.local_ca import LocalCA
from tests.support.backend import Backend
from tests.support.certs import port443_certs, served, wait_served
from tests.support.proxy import sites_toml, start_proxy

pytestmark = pytest.mark.slow

SWAP = 10.0  # seconds: the files are looked at every 2 s


async def test_new_pairs_are_swapped_in_and_bad_ones_refused(
    tmp_path: Path, backend: Backend
) -> None:
    ca = LocalCA(tmp_path / "ca")
    chain, key = tmp_path / "site.pem", tmp_path / "site.key"

    def write(pair: tuple[bytes, bytes]) -> None:
        chain.write_bytes(pair[0])  # one file after the other, as deploy hooks do
        key.write_bytes(pair[1])

    write(ca.issue(["files.test"]))
    body = sites_toml((["files.test"], [backend.url])) + f'cert = "{chain}"\nkey = "{key}"\n'
    proxy = await start_proxy(tmp_path, body, issuer="files")
    try:
        root = lambda: ca.root_cert_path  # noqa: E731
        first = await wait_served(proxy, "files.test", root)

        write(ca.issue(["files.test"]))  # renewed elsewhere, e.g. by certbot
        second = await wait_served(
            proxy, "files.test", root, lambda c: c.serial_number != first.serial_number, SWAP
        )

        mark = len(proxy.log())
        chain.write_bytes(ca.issue(["files.test"])[0])  # a certificate without its key
        await proxy.wait_log(
            re.compile(r"site files.test: refusing .* does not belong to"), since=mark, timeout=SWAP
        )

        expired = LocalCA(tmp_path / "ca", leaf_lifetime=timedelta(seconds=1)).issue(["files.test"])
        await trio.sleep(1.1)
        mark = len(proxy.log())
        write(expired)
        await proxy.wait_log(
            re.compile(r"site files.test: refusing .* expired at .*keeping"),
            since=mark,
            timeout=SWAP,
        )
        still = await served(proxy, "files.test", root())
        assert still is not None and still.serial_number == second.serial_number
        table = port443_certs(tmp_path / "port443.toml")
    finally:
        await proxy.terminate()
    row = table.splitlines()[1]
    assert row.startswith("files.test") and "files" in row and "watched" in row
    assert "unusable" in row and "expired at" in row
