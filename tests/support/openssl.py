"""`openssl s_client` as a test client: one handshake, its outcome parsed. Blocking for tests
whose TLS servers run in threads, async for tests whose backends share the event loop."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from cryptography import x509

from tests.support.run import run

_SESSION = re.compile(r"^(New|Reused), (\S+), Cipher is (\S+)$", re.MULTILINE)
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
TIMEOUT = 30.0


def s_client_argv(port: int, *args: str) -> list[str]:
    return ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args]


@dataclass(frozen=True)
class Handshake:
    returncode: int
    stdout: str
    output: str  # stdout and stderr
    session: str  # "New" or "Reused"; "" without a session
    protocol: str
    cipher: str

    @classmethod
    def parse(cls, returncode: int, stdout: str, stderr: str) -> Handshake:
        match = _SESSION.search(stdout)
        session, protocol, cipher = match.groups() if match else ("", "", "")
        return cls(
            returncode=returncode,
            stdout=stdout,
            output=stdout + stderr,
            session=session,
            protocol=protocol,
            cipher=cipher,
        )

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.cipher not in ("", "(NONE)")

    def certificate(self) -> x509.Certificate | None:
        """The server's leaf, when the handshake succeeded (with -verify_return_error: and
        verified)."""
        pem = _PEM.search(self.stdout)
        if self.returncode != 0 or pem is None:
            return None
        return x509.load_pem_x509_certificate(pem[0].encode())

    def __repr__(self) -> str:
        return self.output


def handshake(port: int, *args: str) -> Handshake:
    """Blocking: for servers that run in a thread of this process."""
    result = subprocess.run(
        s_client_argv(port, *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return Handshake.parse(result.returncode, result.stdout, result.stderr)


async def s_client(
    port: int, *args: str, stdin: bytes = b"", timeout: float = TIMEOUT
) -> Handshake:
    """Without blocking the event loop; `stdin` is sent once connected."""
    result = await run(*s_client_argv(port, *args), stdin=stdin, timeout=timeout)
    return Handshake.parse(
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )
