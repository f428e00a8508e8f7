"""Fuzzing the parsers that run in process: the ClientHello parser and the config loader
behind `port443 check`. Inputs are real hellos and the shipped configs, mutated
(tests/support/fuzzing.py: a few seconds in CI, `PORT443_FUZZ_SECONDS` for longer)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from hypothesis import strategies as st

from proxy.cli import main
from proxy.tls.clienthello import ClientHello, ClientHelloError, Incomplete, parse_client_hello
from tests.support.fuzzing import fuzz_bytes, run_budget
from tests.support.run import ROOT, port443
from tests.support.tls_hello import big_hello, python_hello, split_records

# -- ClientHello ---------------------------------------------------------------------------

TLS_TOKENS: tuple[bytes, ...] = (
    b"\x00", b"\xff", b"\x00\x00", b"\xff\xff", b"\x16\x03\x01", b"\x16\x03\x03\x40\x00",
    b"\x01\x00\x40\x00", b"\x00\x10\x00\x05\x00\x03\x02h2", b"\x00\x00\x00\x05\x00\x03\x00\x00",
    b"\x00\x00\x00\x00", b"\x02h2\x08http/1.1", b"xn--", b"\x80",
)  # fmt: skip


def parse(data: bytes) -> ClientHello | Incomplete | type[ClientHelloError]:
    """The parser's verdict; any exception but ClientHelloError fails the example."""
    try:
        return parse_client_hello(data)
    except ClientHelloError:
        return ClientHelloError


def check_hello_verdicts(data: bytes) -> None:
    """A prefix of the input is undecided or already has the input's verdict: a hello cut
    short is never refused, and what was refused stays refused; undecided, it asks for more
    bytes than it has."""
    verdict = parse(data)
    for end in sorted({len(data) // 2, len(data) * 7 // 8, max(len(data) - 1, 0)}):
        prefix = parse(data[:end])
        if isinstance(prefix, Incomplete):
            assert prefix.needed > end, (end, prefix)
        else:
            assert prefix == verdict, (end, prefix, verdict)


@pytest.mark.slow
def test_fuzz_client_hello() -> None:
    hellos = [
        python_hello("localhost", ["h2", "http/1.1"]),
        python_hello(None),
        python_hello("a" * 60 + ".example", ["acme-tls/1"]),
        big_hello(3),
    ]
    seeds = [*hellos, *(split_records(hello, 100) for hello in hellos[:2])]
    assert all(isinstance(parse(seed), ClientHello) for seed in seeds)
    tried = run_budget(check_hello_verdicts, fuzz_bytes(seeds, TLS_TOKENS, 600), seconds=5)
    assert tried >= 50


# -- the config loader ---------------------------------------------------------------------

# Values to put where a config has one: wrong types, empty and edge values, odd addresses.
TOML_VALUES: tuple[str, ...] = (
    '""', '" "', "[]", '[""]', "[[]]", "{}", "0", "-1", "65536", "1e400", "nan", "inf", "-0.0",
    "true", '"::"', '"0.0.0.0"', '"127.0.0.1:80"', '"[::1]"', '"::1%lo"', '"http://:80"',
    '"http://[::1]"', '"https://127.0.0.1:0"', '"h2c://a b"', '"http://user@h"', '"*.example.com"',
    '"*"', '"a..b"', '"\\u0000"', '"x\\ny"', '"/"', '"/dev/null"', '"."', '"auto"', '"acme"',
    '"local"', '"none"', "1979-05-27", '"\\u00e9.example"', '"' + "a" * 300 + '"',
)  # fmt: skip
TOML_TOKENS: tuple[bytes, ...] = (
    *(value.encode() for value in TOML_VALUES), b"\n", b"=", b"[", b"]", b"[[sites]]\n",
    b'hosts = ["localhost"]\n', b'upstreams = ["http://127.0.0.1:1"]\n', b"#", b"'", b".",
    b"[tls]\ndefault_site = ", b"[admin]\naddress = ", b"[listen]\naddress = ", b"\xff",
)  # fmt: skip
PROBLEM = re.compile(r"^(?P<path>.+?)(:\d+)?: \S")


@st.composite
def config_texts(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A shipped config with values swapped for odd ones (where most findings hide),
    then byte-level mutations on top."""
    lines = draw(st.sampled_from(seeds)).split(b"\n")
    assignments = [i for i, line in enumerate(lines) if b" = " in line]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.sampled_from(assignments))
        key = lines[i].partition(b" = ")[0]
        lines[i] = key + b" = " + draw(st.sampled_from(TOML_VALUES)).encode()
    text = b"\n".join(lines)
    return draw(fuzz_bytes([text], TOML_TOKENS, 64)) if draw(st.booleans()) else text


@pytest.mark.slow
def test_fuzz_config_check(tmp_path: Path) -> None:
    """`port443 check` on mutated configs exits 0 or 1, and every problem it reports is a
    `file:line: key: message` line, never a traceback or a bare exception message."""
    seeds = [path.read_bytes() for path in sorted((ROOT / "config").glob("*.toml"))]
    config = tmp_path / "port443.toml"

    def check(text: bytes) -> None:
        config.write_bytes(text)
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["check", "-c", str(config)])
        assert code in (0, 1)
        lines = stderr.getvalue().splitlines()
        if code == 1:
            assert lines[0] == "port443: invalid configuration:", lines
            for line in lines[1:]:
                match = PROBLEM.match(line)
                assert match and match["path"] == str(config), line

    tried = run_budget(check, config_texts(seeds), seconds=5)
    assert tried >= 50


def test_check_names_the_key_of_an_empty_address(tmp_path: Path) -> None:
    """A finding of the first fuzz run: an empty address was a bare ValueError."""
    config = tmp_path / "port443.toml"
    config.write_text('[listen]\naddress = ""\n[admin]\naddress = ""\n')
    result = port443("check", "-c", str(config))
    stderr = result.stderr
    assert result.returncode == 1, stderr
    assert f'{config}:2: listen.address: must be an IP address such as "0.0.0.0"' in stderr
    assert f"{config}:4: admin.address: must be an IP address" in stderr
    assert "Traceback" not in stderr and "ValueError" not in stderr
