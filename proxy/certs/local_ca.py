"""The built-in certificate authority, like Caddy's local issuer.

One long-lived root (created once under `<certs>/local/`, to be trusted by clients) signs
short-lived leaf certificates, so no leaf ever needs revoking. The root directory is
flock()ed while the root is created, so concurrently starting processes share one root.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs.store import atomic_write, dir_lock

CA_DIR = "local"
ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root.key"
ROOT_LIFETIME = timedelta(days=3650)
LEAF_LIFETIME = timedelta(days=7)
BACKDATE = timedelta(minutes=1)  # tolerate clients whose clock is slightly behind ours


class LocalCAError(RuntimeError):
    """The root on disk cannot be used (unreadable, or key and certificate differ)."""


class LocalCA:
    """Issues leaf certificates signed by the root in `<certs_dir>/local/`."""

    def __init__(
        self,
        certs_dir: Path,
        *,
        leaf_lifetime: timedelta = LEAF_LIFETIME,
        backdate: timedelta = BACKDATE,
    ) -> None:
        self.directory = certs_dir / CA_DIR
        self.leaf_lifetime = leaf_lifetime
        self.backdate = backdate
        self._root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    @property
    def root_cert_path(self) -> Path:
        return self.directory / ROOT_CERT_FILE

    def root_certificate(self) -> x509.Certificate:
        """The root, loaded from disk or created on first use (blocking file I/O)."""
        return self._load_root()[0]

    def issue(self, names: Sequence[str]) -> tuple[bytes, bytes]:
        """A new leaf for `names` as (fullchain PEM, private key PEM); blocks briefly."""
        if not names:
            raise ValueError("a certificate needs at least one name")
        root, root_key = self._load_root()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # the identity is the SAN alone (critical, RFC 5280)
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.backdate)
            .not_valid_after(now + self.leaf_lifetime)
            .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), False
            )
            .sign(root_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def _load_root(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._root is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with dir_lock(self.directory):
                if not self.root_cert_path.exists():
                    self._create_root()
                self._root = self._read_root()
        return self._root

    def _read_root(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key_path = self.directory / ROOT_KEY_FILE
        try:
            cert = x509.load_pem_x509_certificate(self.root_cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise LocalCAError(f"cannot read the local CA root in {self.directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise LocalCAError(f"{key_path} is not the key of {self.root_cert_path}")
        return cert, key

    def _create_root(self) -> None:
        """Write a new root; the key goes first, so an existing root.pem implies its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "port443"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"port443 Local Authority - {now.year} ECC Root"
                ),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.backdate)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(self.directory / ROOT_KEY_FILE, _key_pem(key), mode=0o600)
        atomic_write(self.root_cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names, except IP literals, which clients only match against IP SANs."""
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
