"""Certificates on disk: `<root>/<name>/{fullchain.pem,privkey.pem,meta.json}`.

Several processes share one store without talking to each other, and a crash may happen
at any moment, so a pair is replaced as a unit: the new files are written next to the
old ones as `*.new`, `meta.json.new` is written last as the commit record, and only then
are they renamed into place. Whoever loads next finishes or discards a half-done write.
Each certificate directory is flock()ed while it is written or recovered.

Exactly one process orders and renews each certificate: the one holding its renewal claim,
an flock() on `.renewal-locks/<name>` kept for the life of the process. When the holder dies
the kernel drops the lock and another process claims it; the others follow the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

if TYPE_CHECKING:
    from proxy.config import Config

log = logging.getLogger(__name__)

CHAIN_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"
META_FILE = "meta.json"
STATUS_FILE = "status.json"  # the renewal plan (status.py), beside the pair
LOCK_DIR = ".renewal-locks"
ACCOUNTS_DIR = "acme"  # acme/<directory host>/account.json: the ACME account per CA
ACCOUNT_FILE = "account.json"
NEW_SUFFIX = ".new"
_PAIR_FILES = (CHAIN_FILE, KEY_FILE)  # renamed before META_FILE, the commit record


class InvalidCertificate(ValueError):
    """A certificate/key pair that cannot be used: unparsable, empty, or not matching."""


class StorageUnreachable(OSError):
    """A shared store that did not answer: what needed it waits and retries."""


@dataclass(frozen=True)
class StoredCert:
    name: str
    chain_path: Path
    key_path: Path
    names: tuple[str, ...]  # subjectAltName DNS names and IP addresses
    not_before: datetime  # timezone-aware (UTC)
    not_after: datetime
    serial: int
    meta: dict[str, object] = field(default_factory=dict, hash=False)


class CertificateStorage(Protocol):
    """Where certificates live and who may order them: the certificate manager's whole view
    of storage. `CertStore` is the local directory; `RedisStore` is shared by several
    machines, its claim a lock with a lease kept alive by `heartbeat`."""

    unreachable_since: datetime | None  # a shared store that stopped answering (metrics)

    def load(self, name: str) -> StoredCert | None:
        """The certificate `name`, or None when absent or unusable."""

    def write(
        self, name: str, fullchain_pem: bytes, key_pem: bytes, meta: dict[str, object]
    ) -> None:
        """Replace the certificate `name` as a unit."""

    def version(self, name: str) -> object:
        """A value that changes whenever `name` is replaced: followers poll it, cheaply."""

    def claim_renewal(self, name: str) -> bool:
        """True if this process orders and renews `name` from now on (for as long as it
        lives); False while another process holds the claim. Never blocks. Asked again
        before each order: a claim with a lease can be lost."""

    def heartbeat(self) -> float | None:
        """Keep the claims held alive; seconds until the next call, None: never again."""

    def read_status(self, name: str) -> bytes | None:
        """The recorded renewal plan of `name` (status.py's JSON), None when absent."""

    def write_status(self, name: str, data: bytes) -> None:
        """Record the renewal plan of `name`; OSError when it cannot be recorded."""

    def names(self) -> list[str]:
        """Every certificate name the store holds (`port443 storage migrate`)."""

    def release(self, name: str) -> None:
        """Give the claim on `name` up now, rather than when the process ends."""

    def account(self, ident: str, proposed: bytes) -> bytes:
        """The ACME account for the CA `ident` (account.json's bytes): the stored one, or
        `proposed`, stored now if there was none. Several instances may propose at once;
        the first one's is every instance's. StorageUnreachable when it cannot be asked."""

    def accounts(self) -> dict[str, bytes]:
        """Every ACME account the store keeps, by CA (`port443 storage migrate`)."""


def open_storage(config: Config, *, cache: Path | None = None) -> CertificateStorage:
    """The store `[storage]` names; the directory store unless it is Redis. `cache`
    replaces `certs.dir` as Redis's local copy: commands that look at a store without
    serving from it (`certs`, `storage migrate`) leave the instance's copy alone."""
    local = CertStore(config.certs.dir)
    if config.storage.backend == "directory":
        return local
    from proxy.certs.redis_store import RedisStore  # only Redis users need the package

    return RedisStore(config.storage, local if cache is None else CertStore(cache))


_claims: dict[Path, int] = {}  # lock file -> the fd whose flock() this process holds


class CertStore:
    """The `certs/` directory: one sub-directory per certificate name."""

    unreachable_since: datetime | None = None  # a local directory is always there

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ValueError(f"invalid certificate name {name!r}")
        return self.root / name

    def write(
        self, name: str, fullchain_pem: bytes, key_pem: bytes, meta: dict[str, object]
    ) -> None:
        """Replace the pair `name` so that a crash leaves either the old or the new one."""
        directory = self.path(name)
        directory.mkdir(parents=True, exist_ok=True)
        with dir_lock(directory) as dir_fd:
            _recover(directory, dir_fd)  # a stale commit record must not adopt our files
            _write_file(directory / (CHAIN_FILE + NEW_SUFFIX), fullchain_pem, 0o644)
            _write_file(directory / (KEY_FILE + NEW_SUFFIX), key_pem, 0o600)
            meta_json = json.dumps(meta, sort_keys=True, indent=2).encode()
            _write_file(directory / (META_FILE + NEW_SUFFIX), meta_json, 0o644)
            os.fsync(dir_fd)
            _roll_forward(directory, dir_fd)

    def version(self, name: str) -> tuple[int, int, int] | None:
        """The commit record's (mtime, size, inode): it is renamed into place last."""
        try:
            st = os.stat(self.path(name) / META_FILE)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def claim_renewal(self, name: str) -> bool:
        """flock() `.renewal-locks/<name>` without waiting; a claim, once won, is kept until
        the process exits (a reload's new manager in the same process keeps it)."""
        path = self.root / LOCK_DIR / self.path(name).name
        if path in _claims:
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        _claims[path] = fd
        return True

    def heartbeat(self) -> None:
        """An flock() lives as long as the process: nothing to renew."""
        return None

    def release(self, name: str) -> None:
        fd = _claims.pop(self.root / LOCK_DIR / self.path(name).name, None)
        if fd is not None:
            os.close(fd)  # closing drops the flock()

    def names(self) -> list[str]:
        """The sub-directories holding a commit record (the local CA, accounts and
        challenges live in directories without one)."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if not entry.name.startswith(".") and (entry / META_FILE).is_file()
        )

    def account(self, ident: str, proposed: bytes) -> bytes:
        path = account_path(self.root, ident)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, proposed, 0o600)
            return proposed

    def accounts(self) -> dict[str, bytes]:
        directory = self.root / ACCOUNTS_DIR
        if not directory.is_dir():
            return {}
        return {p.parent.name: p.read_bytes() for p in sorted(directory.glob(f"*/{ACCOUNT_FILE}"))}

    def read_status(self, name: str) -> bytes | None:
        try:
            return (self.path(name) / STATUS_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def write_status(self, name: str, data: bytes) -> None:
        directory = self.path(name)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / STATUS_FILE, data)

    def load(self, name: str) -> StoredCert | None:
        """The pair `name`, or None when it is absent or unusable (logged, never raised)."""
        directory = self.path(name)
        if not directory.is_dir():
            return None
        try:
            with dir_lock(directory) as dir_fd:
                _recover(directory, dir_fd)
                meta = json.loads((directory / META_FILE).read_bytes())
                if not isinstance(meta, dict):
                    raise InvalidCertificate(f"{META_FILE} is not a JSON object")
                return read_pair(name, directory / CHAIN_FILE, directory / KEY_FILE, meta)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # InvalidCertificate and JSON errors included
            log.warning("ignoring stored certificate %s in %s: %s", name, directory, exc)
            return None


def read_pair(
    name: str, chain_path: Path, key_path: Path, meta: dict[str, object] | None = None
) -> StoredCert:
    """Parse a PEM chain and key; InvalidCertificate unless the key matches the leaf."""
    try:
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted key
        raise InvalidCertificate(f"{chain_path} / {key_path}: {exc}") from exc
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise InvalidCertificate(f"{key_path} does not belong to the certificate in {chain_path}")
    return StoredCert(
        name=name,
        chain_path=chain_path,
        key_path=key_path,
        names=subject_alt_names(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        meta=meta or {},
    )


def account_path(root: Path, ident: str) -> Path:
    """Where the directory store keeps the ACME account for the CA `ident`."""
    if not ident or ident in (".", "..") or "/" in ident or "\0" in ident:
        raise ValueError(f"invalid ACME account name {ident!r}")
    return root / ACCOUNTS_DIR / ident / ACCOUNT_FILE


def subject_alt_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names then IP addresses (as text) from the certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*san.get_values_for_type(x509.DNSName), *ips)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _recover(directory: Path, dir_fd: int) -> None:
    """Finish a write whose commit record is complete; otherwise drop its leftovers."""
    commit = directory / (META_FILE + NEW_SUFFIX)
    if commit.exists() and _is_json(commit):
        _roll_forward(directory, dir_fd)
        return
    stray = [directory / (f + NEW_SUFFIX) for f in (*_PAIR_FILES, META_FILE)]
    if any(p.exists() for p in stray):
        for path in stray:
            path.unlink(missing_ok=True)
        os.fsync(dir_fd)


def _is_json(path: Path) -> bool:
    """A commit record cut short by power loss is not valid JSON, so it does not count."""
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True


def _roll_forward(directory: Path, dir_fd: int) -> None:
    for filename in (*_PAIR_FILES, META_FILE):
        new = directory / (filename + NEW_SUFFIX)
        if new.exists():  # absent when an earlier roll-forward renamed it already
            os.replace(new, directory / filename)
    os.fsync(dir_fd)


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[int]:
    """Hold an exclusive flock() on `directory`; yields its fd (for fsyncing entries)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers and crashes see the old or new content."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_file(Path(tmp), data, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames and creations in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write and fsync `path` with permissions `mode`; it never has wider ones meanwhile."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)
        f.write(data)
        f.flush()
        os.fsync(fd)
