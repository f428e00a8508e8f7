"""ACME challenge responses kept on disk, so that any worker process can answer the CA.

The ACME client writes each pending challenge under `<certs>/.challenges/`; whichever
process accepts the CA's validation connection reads it back from there. Files are
replaced atomically, so a reader sees either nothing or a whole response.

- HTTP-01 (RFC 8555 8.3): `.challenges/http-01/<token>` holds the key authorization that
  the port-80 listener returns for `GET /.well-known/acme-challenge/<token>`.
- TLS-ALPN-01 (RFC 8737): `.challenges/tls-alpn-01/<name>.pem` holds a self-signed
  certificate and its key, served to handshakes for `<name>` that offer ALPN `acme-tls/1`.
  For an IP address (RFC 8738 section 6) the validator's SNI, and so `<name>`, is the
  address's reverse-DNS name (`1.0.0.127.in-addr.arpa`) and the certificate names the IP.

With shared storage (Redis) each answer is also published there, and an instance that has
no file for a token or name asks the store: the CA may validate through any instance.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.store import atomic_write
from proxy.tls.policy import server_context

log = logging.getLogger(__name__)

ACME_TLS_ALPN = "acme-tls/1"
HTTP01_PATH_PREFIX = "/.well-known/acme-challenge/"
CHALLENGES_DIR = ".challenges"

# RFC 8737 section 3: id-pe-acmeIdentifier, a critical extension holding the DER
# OCTET STRING (tag 0x04, length 32) of SHA-256(key authorization).
_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


@runtime_checkable
class SharedChallenges(Protocol):
    """Challenge answers visible to every instance (`RedisStore`)."""

    def publish_challenge(self, kind: str, ident: str, answer: bytes) -> None:
        """Publish `answer`; raises when the store cannot be reached."""

    def challenge(self, kind: str, ident: str) -> bytes | None:
        """An answer some instance published, or None."""


_shared: dict[Path, SharedChallenges] = {}  # certs dir -> where its answers are shared


def share_challenges(certs_dir: Path, shared: SharedChallenges | None) -> None:
    """Publish the answers written under `certs_dir` through `shared` too, and answer from
    it what another instance published; None: this directory alone (the default)."""
    if shared is None:
        _shared.pop(certs_dir, None)
    else:
        _shared[certs_dir] = shared


def http01_path(certs_dir: Path, token: str) -> Path:
    """Where the key authorization for `token` lives; ValueError for a malformed token."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"malformed ACME token {token!r}")
    return certs_dir / CHALLENGES_DIR / "http-01" / token


def tls_alpn01_path(certs_dir: Path, name: str) -> Path:
    """Where the challenge certificate for `name` lives; ValueError for a malformed name."""
    return certs_dir / CHALLENGES_DIR / "tls-alpn-01" / f"{_dns_name(name)}.pem"


def write_http01(certs_dir: Path, token: str, key_authorization: str) -> Path:
    """Publish an HTTP-01 response; returns the file to remove once the authorization is done."""
    path = http01_path(certs_dir, token)
    answer = key_authorization.encode("ascii")
    _write(path, answer)
    _publish(certs_dir, "http-01", token, answer)
    return path


def write_tls_alpn01(certs_dir: Path, identifier: str, key_authorization: str) -> Path:
    """Publish a TLS-ALPN-01 certificate for a DNS name or an IP address; returns the file
    to remove when the authz is done."""
    address = _ip_address(identifier)
    name = _dns_name(identifier if address is None else address.reverse_pointer)
    path = tls_alpn01_path(certs_dir, name)
    answer = tls_alpn01_certificate(
        x509.DNSName(name) if address is None else x509.IPAddress(address), key_authorization
    )
    _write(path, answer)
    _publish(certs_dir, "tls-alpn-01", name, answer)
    return path


def http01_key_authorization(certs_dir: Path, token: str) -> bytes | None:
    """The body to answer `GET /.well-known/acme-challenge/<token>` with, or None (404)."""
    try:
        return http01_path(certs_dir, token).read_bytes()
    except ValueError:
        return None
    except FileNotFoundError:
        return _published(certs_dir, "http-01", token)


class TlsAlpn01Contexts:
    """Server contexts answering `acme-tls/1` handshakes from the challenge files under
    `certs_dir`, each reused while its file's (mtime, inode) stays the same."""

    def __init__(self, certs_dir: Path) -> None:
        self._certs_dir = certs_dir
        self._cached: dict[Path, tuple[tuple[int, int], ssl.SSLContext]] = {}

    def context_for(self, server_name: str) -> ssl.SSLContext | None:
        """The context for a pending challenge for `server_name`, or None.

        The peer's SNI picks the file, so it is validated before it touches the file system.
        """
        try:
            path = tls_alpn01_path(self._certs_dir, server_name)
        except ValueError:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            self._cached.pop(path, None)
            return self._published_context(path)
        version = (st.st_mtime_ns, st.st_ino)
        cached = self._cached.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            ctx = server_context(path, path, [ACME_TLS_ALPN])
        except (OSError, ssl.SSLError):  # replaced or removed between stat() and load
            self._cached.pop(path, None)
            return None
        self._cached[path] = (version, ctx)
        return ctx

    def _published_context(self, path: Path) -> ssl.SSLContext | None:
        """A context for an answer another instance published (not cached: it is rare,
        and the answer may be withdrawn any moment)."""
        answer = _published(self._certs_dir, "tls-alpn-01", path.stem)
        if answer is None:
            return None
        fd, tmp = tempfile.mkstemp(prefix="port443-tls-alpn-01.", suffix=".pem")  # 0600
        try:
            os.write(fd, answer)
            os.close(fd)
            return server_context(Path(tmp), Path(tmp), [ACME_TLS_ALPN])
        except (OSError, ssl.SSLError) as exc:
            log.warning("unusable TLS-ALPN-01 answer for %s in the store: %s", path.stem, exc)
            return None
        finally:
            Path(tmp).unlink(missing_ok=True)


def tls_alpn01_certificate(
    identifier: x509.DNSName | x509.IPAddress, key_authorization: str
) -> bytes:
    """PEM certificate and key proving control of `identifier` (its only subjectAltName)
    to a TLS-ALPN-01 validator."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([identifier]), critical=True)
        .add_extension(
            x509.UnrecognizedExtension(_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key_pem


def _dns_name(name: str) -> str:
    """`name` in the lower-case form used for files; ValueError unless it is a DNS name."""
    normal = name.lower().rstrip(".")
    if not _DNS_NAME.fullmatch(normal):
        raise ValueError(f"malformed DNS name {name!r}")
    return normal


def _ip_address(identifier: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(identifier)
    except ValueError:
        return None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data, 0o600)


def _publish(certs_dir: Path, kind: str, ident: str, answer: bytes) -> None:
    """Share an answer; when the store is unreachable only this instance can answer."""
    shared = _shared.get(certs_dir)
    if shared is None:
        return
    try:
        shared.publish_challenge(kind, ident, answer)
    except Exception as exc:  # the store's own error types; logged, not fatal
        log.warning("%s answer for %s not shared, only this instance has it: %s", kind, ident, exc)


def _published(certs_dir: Path, kind: str, ident: str) -> bytes | None:
    shared = _shared.get(certs_dir)
    return None if shared is None else shared.challenge(kind, ident)
