"""Bounded, reproducible fuzzing with hypothesis: mutated real protocol bytes, a time budget.

Each target runs for a budget of seconds: in CI a few, on demand as long as asked
(`PORT443_FUZZ_SECONDS=600` gives every target that many). A budget is spent as a sequence
of hypothesis runs of `EXAMPLES_PER_SEED` examples with fixed seeds 0, 1, 2, ... (the first
one is `PORT443_FUZZ_SEED`), so CI explores the same inputs every time however far a slow
machine gets, and a failure names the seed that reproduces it; hypothesis prints the input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

SECONDS = float(os.environ.get("PORT443_FUZZ_SECONDS", "0"))  # 0: each target's CI budget
FIRST_SEED = int(os.environ.get("PORT443_FUZZ_SEED", "0"))
EXAMPLES_PER_SEED = 50

# Bytes that matter to HTTP parsers: line ends, separators, numbers at the edges of integer
# types, framing headers. Mutations insert them where random bytes would rarely land.
HTTP_TOKENS: tuple[bytes, ...] = (
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"=", b"\"",
    b"0", b"-1", b"+1", b"0x10", b"1 1", b"18446744073709551616", b"9" * 30, b"\xff", b"\x80",
    b"chunked", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"HTTP/1.0",
    b"HTTP/1.1", b"HTTP/2.0", b"Host: localhost\r\n", b"Expect: 100-continue\r\n",
    b"Connection: close\r\n", b"Connection: keep-alive, Upgrade\r\n", b"Upgrade: echo\r\n",
    b"\r\n 0\r\n", b"0\r\n\r\n", b"5;ext=\"x\"\r\nhello\r\n", b"Trailer: x\r\n",
)  # fmt: skip

_OPERATIONS = ("flip", "token", "bytes", "delete", "repeat", "truncate", "splice")


@st.composite
def mutated(
    draw: st.DrawFn, seeds: Sequence[bytes], tokens: Sequence[bytes] = HTTP_TOKENS
) -> bytes:
    """One of `seeds` after up to six mutations: bit flips, inserted tokens or random
    bytes, deletions, repeats, truncation, and splicing in the tail of another seed."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        operation = draw(st.sampled_from(_OPERATIONS))
        at = draw(st.integers(0, len(data)))
        if operation == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "token":
            data[at:at] = draw(st.sampled_from(tokens))
        elif operation == "bytes":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif operation == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 64))] * draw(st.integers(1, 4))
        elif operation == "truncate":
            del data[at:]
        elif operation == "splice":
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def fuzz_bytes(
    seeds: Sequence[bytes], tokens: Sequence[bytes] = HTTP_TOKENS, random_size: int = 256
) -> st.SearchStrategy[bytes]:
    """Mostly mutated seeds, sometimes plain random bytes."""
    seeded = mutated(seeds, tokens)
    return st.one_of(seeded, seeded, st.binary(max_size=random_size))


def run_budget(
    example: Callable[[Any], None],
    strategy: st.SearchStrategy[Any],
    seconds: float,
    *,
    shrink: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Call `example` on inputs drawn from `strategy` for `seconds` (or PORT443_FUZZ_SECONDS),
    or until `stop()`; returns how many inputs were tried. `shrink=False` for targets where
    a failure may be a timeout: replaying it hundreds of times would take hours."""
    deadline = time.monotonic() + (SECONDS or seconds)
    phases = (Phase.generate, Phase.shrink) if shrink else (Phase.generate,)
    tried = 0

    def counted(data: Any) -> None:
        nonlocal tried
        tried += 1
        example(data)

    configured = settings(
        max_examples=EXAMPLES_PER_SEED,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )(given(strategy)(counted))
    seed = FIRST_SEED
    while time.monotonic() < deadline and not stop():
        try:
            hypothesis.seed(seed)(configured)()
        except Exception as exc:
            exc.add_note(f"fuzz: hypothesis seed {seed} (again: PORT443_FUZZ_SEED={seed})")
            raise
        seed += 1
    return tried
