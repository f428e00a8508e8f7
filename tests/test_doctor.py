"""`port443 doctor`: real ports, the system resolver for names that resolve on loopback, an
injected resolver for names that resolve elsewhere, an ACME directory that does not answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config_load import load_config
from proxy.doctor import diagnose, is_local_address
from tests.support.backend import Backend
from tests.support.net import free_port
from tests.support.proxy import sites_toml, start_proxy, write_config
from tests.support.run import ROOT

TEST_NET = "192.0.2.7"  # RFC 5737: never an address of this machine


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "-c", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_local_addresses() -> None:
    assert is_local_address("127.0.0.1")
    assert not is_local_address(TEST_NET)


@pytest.mark.slow
async def test_ports_held_by_port443_itself_or_by_another_process(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        result = _doctor(tmp_path / "port443.toml")
        assert result.returncode == 0, result.stdout
        assert f"held by port443 itself (pid {proxy.process.pid})" in result.stdout
        assert "[OK  ] DNS localhost: 127.0.0.1" in result.stdout
        assert "[OK  ] certificate localhost: " in result.stdout
    finally:
        assert await proxy.terminate() == 0
    with socket.socket() as holder:  # this test's process holds the HTTPS port now
        holder.bind(("127.0.0.1", proxy.https_port))
        holder.listen()
        result = _doctor(tmp_path / "port443.toml")
    assert result.returncode == 1
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert (
        f"[FAIL] https port 127.0.0.1 {proxy.https_port}: in use by {comm} (pid {os.getpid()})"
        in result.stdout
    )
    assert "1 failed" in result.stdout


def test_names_elsewhere_and_an_unreachable_ca(tmp_path: Path) -> None:
    body = (
        f'[acme]\ndirectory = "https://127.0.0.1:{free_port()}/directory"\n'
        + sites_toml((["here.test"], ["http://127.0.0.1:1"]))
        + sites_toml((["elsewhere.test"], ["http://127.0.0.1:1"]))
        + sites_toml((["acme-elsewhere.test", "nowhere.test"], ["http://127.0.0.1:1"]))
        + 'issuer = "acme"\n'
    )
    config = load_config(
        write_config(tmp_path, body, http_port=free_port(), https_port=free_port())
    )
    zone = {"here.test": ["127.0.0.1"], "elsewhere.test": [TEST_NET],
            "acme-elsewhere.test": [TEST_NET]}  # fmt: skip
    checks = {check.name: check for check in diagnose(config, lambda h: zone.get(h, []))}
    assert checks["DNS here.test"].verdict == "ok"
    assert checks["DNS elsewhere.test"].verdict == "warn"  # a local certificate: no CA to fail
    elsewhere = checks["DNS acme-elsewhere.test"]
    assert elsewhere.verdict == "fail" and TEST_NET in elsewhere.detail
    assert elsewhere.advice is not None and "CA validates" in elsewhere.advice
    assert checks["DNS nowhere.test"].verdict == "fail"
    ca = next(check for name, check in checks.items() if name.startswith("ACME https://"))
    assert ca.verdict == "fail" and "Connection refused" in ca.detail
    assert checks["certificate here.test"].verdict == "warn"  # none yet, issued at start
