"""curl as the test client, with one result type for every use."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.run import run

MAX_TIME = 30.0  # seconds curl may take (--max-time); the process gets 30 more


@dataclass(frozen=True)
class Reply:
    """What one curl run saw. `heads` holds every response head in arrival order (1xx,
    redirects, the final one), each a list of lines: the status line, then the fields."""

    returncode: int
    heads: list[list[str]]
    body: bytes  # curl's standard output: the body, or what -w writes
    stderr: bytes

    @property
    def head(self) -> list[str]:
        """The final response head; empty when no response arrived."""
        return self.heads[-1] if self.heads else []

    @property
    def status(self) -> int:
        """The final status code; 0 when no response arrived."""
        return int(self.head[0].split()[1]) if self.head else 0

    @property
    def text(self) -> str:
        """The body as text without its final newline (the proxy's own short answers)."""
        return self.body.decode(errors="replace").removesuffix("\n")

    def header(self, name: str) -> str | None:
        """The first value of field `name` in the final head."""
        for line in self.head[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                return value.strip()
        return None


def _heads(dump: str) -> list[list[str]]:
    """`curl -D` output: heads separated by an empty line."""
    blocks = dump.replace("\r\n", "\n").split("\n\n")
    return [block.split("\n") for block in blocks if block.startswith("HTTP/")]


async def curl(*args: str, check: bool = True, max_time: float = MAX_TIME) -> Reply:
    """`curl -sS ARGS`; with `check`, a failed transfer fails the test with curl's message."""
    with tempfile.TemporaryDirectory(prefix="curl-") as directory:
        dump = Path(directory) / "heads"
        result = await run(
            "curl", "-sS", "--max-time", str(max_time), "-D", str(dump), *args,
            timeout=max_time + 30,
        )  # fmt: skip
        heads = _heads(dump.read_text(errors="replace")) if dump.exists() else []
    reply = Reply(
        returncode=result.returncode, heads=heads, body=result.stdout, stderr=result.stderr
    )
    if check:
        assert reply.returncode == 0, f"curl {' '.join(args)}: exit {reply.returncode}\n" + (
            reply.stderr.decode(errors="replace")
        )
    return reply
