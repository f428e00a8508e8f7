"""The built-in CA: leaves checked by `openssl verify`, the root created exactly once."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.certs.local_ca import LocalCA, LocalCAError
from proxy.certs.store import atomic_write

REPO = Path(__file__).resolve().parents[1]


def openssl_verify(ca: LocalCA, chain: bytes, tmp_path: Path, *checks: str) -> str:
    ca.root_certificate()  # the root is created on first use
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(chain)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.root_cert_path), *checks, str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout + result.stderr if result.returncode else "OK"


def test_leaf_verifies_against_root(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "certs")
    chain, _ = ca.issue(["a.test", "www.a.test", "127.0.0.1", "::1"])
    checks = ["-purpose", "sslserver", "-x509_strict"]
    assert openssl_verify(ca, chain, tmp_path, *checks, "-verify_hostname", "www.a.test") == "OK"
    assert openssl_verify(ca, chain, tmp_path, *checks, "-verify_ip", "::1") == "OK"
    assert "mismatch" in openssl_verify(ca, chain, tmp_path, "-verify_hostname", "b.test")


def test_leaf_from_another_root_does_not_verify(tmp_path: Path) -> None:
    ours, theirs = LocalCA(tmp_path / "ours"), LocalCA(tmp_path / "theirs")
    chain, _ = theirs.issue(["a.test"])
    assert "unable to get local issuer certificate" in openssl_verify(ours, chain, tmp_path)


def test_leaf_contents(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path)
    before = datetime.now(UTC).replace(microsecond=0)
    chain, key_pem = ca.issue(["a.test", "127.0.0.1"])
    (leaf,) = x509.load_pem_x509_certificates(chain)  # the root is not part of the chain
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["a.test"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.root_certificate().extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == root_ski.value.digest
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert b"PRIVATE KEY" in key_pem
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=7, minutes=1)
    assert before - timedelta(minutes=1) <= leaf.not_valid_before_utc
    assert leaf.not_valid_before_utc <= datetime.now(UTC) - timedelta(seconds=59)


def test_lifetime_and_backdate_are_configurable(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path, leaf_lifetime=timedelta(seconds=30), backdate=timedelta(0))
    leaf = x509.load_pem_x509_certificate(ca.issue(["a.test"])[0])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(seconds=30)


def test_root(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path)
    root = ca.root_certificate()
    root.verify_directly_issued_by(root)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert ca.root_cert_path == tmp_path / "local" / "root.pem"
    assert stat.S_IMODE((tmp_path / "local" / "root.key").stat().st_mode) == 0o600


def test_root_is_reused(tmp_path: Path) -> None:
    first = LocalCA(tmp_path)
    first.issue(["a.test"])
    files = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    second = LocalCA(tmp_path)
    chain, _ = second.issue(["b.test"])
    assert second.root_certificate() == first.root_certificate()
    assert {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()} == files
    x509.load_pem_x509_certificate(chain).verify_directly_issued_by(first.root_certificate())


def test_root_key_mismatch_is_an_error(tmp_path: Path) -> None:
    LocalCA(tmp_path / "a").root_certificate()
    LocalCA(tmp_path / "b").root_certificate()
    other_key = (tmp_path / "b" / "local" / "root.key").read_bytes()
    atomic_write(tmp_path / "a" / "local" / "root.key", other_key, 0o600)
    with pytest.raises(LocalCAError, match="is not the key"):
        LocalCA(tmp_path / "a").issue(["a.test"])


CREATE_ROOT = """
import sys, time
from pathlib import Path
from cryptography.hazmat.primitives import hashes
from proxy.certs.local_ca import LocalCA
start = float(sys.argv[2])
while time.time() < start:
    pass
print(LocalCA(Path(sys.argv[1])).root_certificate().fingerprint(hashes.SHA256()).hex())
"""


def test_concurrent_starts_create_one_root(tmp_path: Path) -> None:
    start = time.time() + 2.0  # every process is past its imports and spinning by then
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_ROOT, str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(4)
    ]
    fingerprints = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes)
    on_disk = LocalCA(tmp_path).root_certificate().fingerprint(hashes.SHA256()).hex()
    assert fingerprints == {on_disk}
