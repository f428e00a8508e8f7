"""An outside audit of the TLS the running proxy serves: testssl.sh (Debian package
`testssl.sh`) against a site that is also the `default_site`, with its fast options.

No finding may be above LOW except the known false positives below, each for a reason that
holds for any server following Mozilla's intermediate profile with the built-in local CA.
The HTTP header checks (`-h`) are left out: security headers such as CSP are the
application's, not the proxy's (HSTS is tested in tests/test_h1_proxy.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.run import run

KNOWN_FALSE_POSITIVES = {
    # Mozilla intermediate: every offered suite is strong, so the client picks the one its
    # hardware runs fastest ("cipher preference: client chooses"); testssl 3.0 wants an order.
    "cipher_order": "client chooses, as Mozilla intermediate recommends",
    # The local CA's leaves live 7 days and are renewed long before they end.
    "cert_expirationStatus": "local CA: short-lived leaf certificates",
    "cert_notAfter": "local CA: short-lived leaf certificates",
    # Short-lived certificates carry neither (as Let's Encrypt's since 2025): revocation
    # is their expiry.
    "cert_revocation": "local CA: short-lived leaf certificates, no CRL or OCSP",
}
ABOVE_LOW = {"MEDIUM", "HIGH", "CRITICAL", "FATAL"}
MUST_BE_OK = ("SSLv2", "SSLv3", "heartbleed", "CCS", "ROBOT", "secure_client_renego", "CRIME_TLS")


@pytest.fixture
async def default_site(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    body = '[tls]\ndefault_site = "a.test"\n' + sites_toml((["a.test"], [backend.url]))
    running = await start_proxy(tmp_path, body, http=False)
    yield running
    await running.terminate()


@pytest.mark.slow
async def test_testssl_finds_nothing_above_low(default_site: ProxyProcess, tmp_path: Path) -> None:
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    assert testssl, "testssl.sh missing: it is in .ci/apt-packages.txt"
    report = tmp_path / "testssl.json"
    result = await run(
        testssl, "--quiet", "--color", "0", "--warnings", "off", "--fast",
        "--nodns", "none", "--ip", "127.0.0.1", "--add-ca", str(default_site.root_ca),
        "--connect-timeout", "10", "--openssl-timeout", "10", "--jsonfile", str(report),
        "-p", "-s", "-f", "-P", "-S", "-U",  # protocols, ciphers, PFS, preference, defaults, vulns
        f"a.test:{default_site.https_port}",
        timeout=300,
    )  # fmt: skip
    output = result.stdout.decode(errors="replace")
    findings = json.loads(report.read_text())
    severities = {finding["id"]: finding["severity"] for finding in findings}
    for check in MUST_BE_OK:
        assert severities.get(check) == "OK", (check, severities.get(check), output[-3000:])
    assert severities.get("TLS1_3") == "OK" and severities.get("TLS1") in ("INFO", "OK")
    high = [
        f"{finding['severity']} {finding['id']}: {finding['finding']}"
        for finding in findings
        if finding["severity"] in ABOVE_LOW and finding["id"] not in KNOWN_FALSE_POSITIVES
    ]
    assert not high, "\n".join(high)
