"""A real authoritative DNS server on loopback: Knot DNS, run by the test as this user.

It serves the zone `example.test` (apex, `*` and `ns` at 127.0.0.1) on a free port and takes
RFC 2136 updates signed with the TSIG key `port443-key.`, as a deployment's primary would.
Nothing of the system's Knot is used: configuration, zone, journal and control socket all
live in the test's directory.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from tests.support.net import free_dns_port

ZONE = "example.test"
KEY_NAME = "port443-key."
START_TIMEOUT = 15.0

_ZONE_FILE = """\
$ORIGIN example.test.
$TTL 60
@   SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
@   NS  ns.example.test.
@   A   127.0.0.1
*   A   127.0.0.1
ns  A   127.0.0.1
"""


@dataclass
class Knot:
    port: int
    tsig_secret: str  # base64, as keymgr prints it

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dns_toml(self, *, secret: str | None = None, propagation_timeout: float = 10) -> str:
        """An [acme.dns] table that updates this server and checks propagation on it."""
        return (
            f'[acme.dns]\nprovider = "rfc2136"\nserver = "{self.server}"\n'
            f'tsig_key_name = "{KEY_NAME}"\ntsig_secret = "{secret or self.tsig_secret}"\n'
            f'tsig_algorithm = "hmac-sha256"\npropagation_timeout = {propagation_timeout}\n'
            f'propagation_servers = ["{self.server}"]\n'
        )

    def txt(self, name: str) -> set[str]:
        """The TXT values the server answers for `name` right now."""
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        response = dns.query.udp(query, "127.0.0.1", timeout=5, port=self.port)
        return {
            b"".join(rdata.strings).decode()
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rdata in rrset
        }


@contextmanager
def run_knot(workdir: Path) -> Iterator[Knot]:
    """Run knotd in the foreground until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_dns_port()
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    (workdir / f"{ZONE}.zone").write_text(_ZONE_FILE)
    config = workdir / "knot.conf"
    config.write_text(
        f"server:\n    rundir: {workdir}\n    listen: 127.0.0.1@{port}\n"
        f"    pidfile: {workdir}/knot.pid\n"
        f"database:\n    storage: {workdir}\n"
        f"log:\n  - target: stdout\n    any: info\n"
        f"key:\n  - id: {KEY_NAME}\n    algorithm: hmac-sha256\n    secret: {secret}\n"
        f"acl:\n  - id: update\n    key: {KEY_NAME}\n    action: update\n"
        f"zone:\n  - domain: {ZONE}\n    storage: {workdir}\n    file: {ZONE}.zone\n"
        f"    acl: update\n"
    )
    log_path = workdir / "knot.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["knotd", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, env=os.environ
        )
    knot = Knot(port=port, tsig_secret=secret)
    try:
        _wait_serving(knot, process, log_path)
        yield knot
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_serving(knot: Knot, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the zone is loaded: its SOA is answered authoritatively."""
    deadline = time.monotonic() + START_TIMEOUT
    query = dns.message.make_query(ZONE, dns.rdatatype.SOA)
    while True:
        try:
            response = dns.query.udp(query, "127.0.0.1", timeout=0.5, port=knot.port)
            if response.answer:
                return
        except (OSError, dns.exception.Timeout):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"knotd did not start ({process.poll()}):\n{log_path.read_text()}")
        time.sleep(0.05)
