"""CPU per MB of each response encoder at port443's levels (proxy/http/encoding.py).

Feeds 64 KiB pieces, as upstream reads arrive, through the proxy's own `Encoder`, flushing
after each (what a response whose every read drained the upstream's buffer costs, the worst
case) and, for comparison, only at the end. Two bodies: JSON lines and Python source (text
a site serves: data and code). CPU is this process's (`time.process_time`), one core.

    .venv/bin/python -m bench.encoding [--mb 32]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

from proxy.config import Coding
from proxy.http.encoding import Encoder

PIECE = 64 * 1024
MB = 1024 * 1024
CODINGS: tuple[Coding, ...] = ("gzip", "br", "zstd")


def json_lines(size: int) -> bytes:
    """API-like JSON: repeated keys, varying numbers and words."""
    words = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
    lines: list[bytes] = []
    total = i = 0
    while total < size:
        record = {"id": i, "name": words[i % 8] + str(i * 7919 % 1000), "score": i * 31 % 997}
        line = json.dumps(record).encode() + b"\n"
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)[:size]


def python_source(size: int) -> bytes:
    """The standard library's own source, repeated up to `size`."""
    parts: list[bytes] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= size:
            break
    text = b"".join(parts)
    return (text * (size // len(text) + 1))[:size]


def measure(coding: Coding, body: bytes, *, flush_each: bool) -> tuple[float, float]:
    """(CPU milliseconds per MB of input, compressed size / input size)."""
    encoder = Encoder(coding)
    out = 0
    started = time.process_time()
    for offset in range(0, len(body), PIECE):
        out += len(encoder.feed(body[offset : offset + PIECE], flush=flush_each, end=False))
    out += len(encoder.feed(b"", flush=False, end=True))
    cpu = time.process_time() - started
    return cpu * 1000 / (len(body) / MB), out / len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=32, help="body size per run (MB)")
    size = parser.parse_args().mb * MB
    bodies = {"JSON lines": json_lines(size), "Python source": python_source(size)}
    print(
        "| body | coding | CPU ms/MB (flush per 64 KiB) | ratio | CPU ms/MB (one flush) | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name, body in bodies.items():
        for coding in CODINGS:
            each_cpu, each_ratio = measure(coding, body, flush_each=True)
            end_cpu, end_ratio = measure(coding, body, flush_each=False)
            print(
                f"| {name} | {coding} | {each_cpu:.1f} | {each_ratio:.3f} "
                f"| {end_cpu:.1f} | {end_ratio:.3f} |"
            )


if __name__ == "__main__":
    main()
