"""`openssl s_client` as a test client: one handshake, its outcome parsed."""

from __future__ import annotations

import re
import subprocess


class Handshake:
    def __init__(self, port: int, *args: str) -> None:
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.output = result.stdout + result.stderr
        match = re.search(r"^New, (\S+), Cipher is (\S+)$", result.stdout, re.MULTILINE)
        self.ok = result.returncode == 0 and match is not None and match[2] != "(NONE)"
        self.protocol, self.cipher = (match[1], match[2]) if match else ("", "")

    def __repr__(self) -> str:
        return self.output
