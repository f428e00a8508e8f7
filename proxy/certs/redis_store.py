"""Certificates shared by several instances through Redis (`[storage] backend = "redis"`).

Keys, all under `prefix`: `cert:<name>` (a hash: chain, encrypted key, meta, version,
token), `status:<name>` (the renewal plan), `lock:<name>` (`<instance>|<token>|<since>`,
with a lease), `fence:<name>` (the last token handed out), `challenge:<kind>:<id>` and
`account:<CA>` (the encrypted account.json every instance uses at that CA).

One lock per certificate decides who orders it. Taking the lock draws a fencing token
from `fence:<name>`; a write succeeds only while that counter still equals the writer's
token, checked and written in one script, so a holder paused past its lease (another
instance has taken the lock since) cannot overwrite the newer certificate. The holder
renews its lease from `heartbeat()`; a dead holder's lock expires after `lock_ttl`.

Every certificate read is copied into the local directory store (`certs.dir`), which is
what TLS contexts load from and what is served while Redis is unreachable: a failed read
never deletes or replaces anything, it returns the local copy. Private keys are encrypted
with AES-GCM before they leave the process (see docs/CLUSTER.md for the threat model).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar, cast

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.sentinel import Sentinel

from proxy.certs.store import CertStore, StorageUnreachable, StoredCert
from proxy.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
CHALLENGE_TTL = 3600  # seconds: an unused challenge answer expires with its authorization
_TIMEOUT = 2.0  # seconds per Redis round trip: a handshake may be waiting on a challenge
_NONCE = 12
_VERSION = b"v1"

_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. '|' .. token .. '|' .. ARGV[3], 'PX', ARGV[2])
return token
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_FIRST_WINS = """
if redis.call('set', KEYS[1], ARGV[1], 'NX') then return ARGV[1] end
return redis.call('get', KEYS[1])
"""
_FENCED_WRITE = """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[1], 'chain', ARGV[2], 'key', ARGV[3], 'meta', ARGV[4],
           'version', ARGV[5], 'token', ARGV[1])
return 1
"""


class LockLost(RuntimeError):
    """This instance no longer holds the certificate's lock: it must not write it."""


class KeyDecryptionError(ValueError):
    """A private key in Redis that the configured encryption key does not open."""


class KeyCipher:
    """AES-256-GCM for private keys at rest; the certificate name is bound in as
    associated data, so a key copied to another name's entry does not decrypt."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def from_config(cls, storage: StorageConfig) -> KeyCipher:
        text = storage.encryption_key
        if text is None:
            if storage.encryption_key_file is None:
                raise ValueError("storage: an encryption key is required with Redis")
            text = storage.encryption_key_file.read_text().strip()
        key = base64.urlsafe_b64decode(text)
        if len(key) != 32:
            raise ValueError("storage: the encryption key must be 32 bytes (base64url)")
        return cls(key)

    def encrypt(self, name: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, name.encode())

    def decrypt(self, name: str, blob: bytes) -> bytes:
        if not blob.startswith(_VERSION):
            raise KeyDecryptionError(f"{name}: unknown key format")
        nonce, sealed = blob[2 : 2 + _NONCE], blob[2 + _NONCE :]
        try:
            return self._aead.decrypt(nonce, sealed, name.encode())
        except InvalidTag as exc:
            raise KeyDecryptionError(f"{name}: the encryption key does not open it") from exc


def redis_client(storage: StorageConfig, timeout: float) -> redis.Redis:
    """A client for `[storage]`'s Redis; every round trip gives up after `timeout` s. With
    Sentinels, each new connection asks them for the current master, so a failover is
    followed (a command on the old master fails once, like any unreachable moment)."""
    timeouts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if storage.sentinels and storage.service_name is not None:
        # redis-py's sentinel module has no type hints
        sentinel = Sentinel(list(storage.sentinels), sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
        master = sentinel.master_for(storage.service_name, password=storage.password)  # type: ignore[no-untyped-call]
        return cast(redis.Redis, master)
    if storage.url is None:
        raise ValueError('storage: backend = "redis" needs url or sentinels')
    return redis.Redis.from_url(storage.url, password=storage.password, **timeouts)


class RedisStore:
    """The `CertificateStorage` several instances share; `cache` is this instance's copy."""

    def __init__(
        self,
        storage: StorageConfig,
        cache: CertStore,
        *,
        client: redis.Redis | None = None,
        instance: str | None = None,
    ) -> None:
        self._client = client or redis_client(storage, _TIMEOUT)
        self._prefix = storage.prefix
        self._ttl_ms = int(storage.lock_ttl * 1000)
        self._cipher = KeyCipher.from_config(storage)
        self._cache = cache
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, str] = {}  # name -> our lock value (its token inside)
        # name -> the fencing token of our last lock, kept when the lease is lost: whether
        # a write may still land is for the fence in Redis to say, nothing else
        self._tokens: dict[str, str] = {}
        self._versions: dict[str, object] = {}  # name -> last version read from Redis
        self._acquire = self._client.register_script(_ACQUIRE)
        self._extend = self._client.register_script(_EXTEND)
        self._fenced_write = self._client.register_script(_FENCED_WRITE)
        self._release = self._client.register_script(_RELEASE)
        self._first_wins = self._client.register_script(_FIRST_WINS)
        self.unreachable_since: datetime | None = None  # metrics and the log say so

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    def _call(self, what: str, op: Callable[[], T]) -> T:
        """Run one Redis operation, noting whether Redis answered; RedisError propagates."""
        try:
            result = op()
        except redis.RedisError as exc:
            if self.unreachable_since is None:
                self.unreachable_since = datetime.now(UTC)
                log.warning(
                    "storage: Redis unreachable (%s: %s); serving the certificates held "
                    "locally, renewals wait until it is back",
                    what,
                    exc,
                )
            else:
                log.debug("storage: Redis still unreachable (%s: %s)", what, exc)
            raise
        if self.unreachable_since is not None:
            log.info("storage: Redis reachable again (down since %s)", self.unreachable_since)
            self.unreachable_since = None
        return result

    # -- CertificateStorage ---------------------------------------------------------------

    def load(self, name: str) -> StoredCert | None:
        """The shared certificate, through the local copy; the local copy alone when Redis
        does not answer. A certificate Redis does not have is None (the copy is kept)."""
        self._cache.path(name)  # validates the name before it becomes a key
        try:
            entry = self._call("load", lambda: self._client.hgetall(self._key("cert", name)))
        except redis.RedisError:
            return self._cache.load(name)
        fields = cast(dict[bytes, bytes], entry)
        if not fields:
            return None
        version = fields[b"version"].decode()
        cached = self._cache.load(name)
        if cached is not None and cached.meta.get("store_version") == version:
            self._versions[name] = version
            return cached
        try:
            key_pem = self._cipher.decrypt(name, fields[b"key"])
            meta = json.loads(fields[b"meta"])
        except (KeyDecryptionError, ValueError) as exc:
            log.error("storage: ignoring certificate %s in Redis: %s", name, exc)
            return cached
        self._cache.write(name, fields[b"chain"], key_pem, {**meta, "store_version": version})
        self._versions[name] = version
        return self._cache.load(name)

    def write(
        self, name: str, fullchain_pem: bytes, key_pem: bytes, meta: dict[str, object]
    ) -> None:
        """Store a new certificate unless another instance has taken its lock since this
        one took it (the fencing token decides; a lease that ran out while nobody took
        over still lets the result in). LockLost when refused, RedisError when Redis
        does not answer."""
        self._cache.path(name)
        token = self._tokens.get(name)
        if token is None:
            raise LockLost(f"{name}: this instance never held the renewal lock")
        version = uuid.uuid4().hex
        sealed = self._cipher.encrypt(name, key_pem)
        meta_json = json.dumps(meta, sort_keys=True)
        keys = [self._key("cert", name), self._key("fence", name)]
        args: list[bytes | str] = [token, fullchain_pem, sealed, meta_json, version]
        written = self._call("write", lambda: self._fenced_write(keys=keys, args=args))
        if not written:
            self._held.pop(name, None)
            self._tokens.pop(name, None)
            raise LockLost(f"{name}: another instance took the renewal lock; not overwriting")
        self._cache.write(name, fullchain_pem, key_pem, {**meta, "store_version": version})
        self._versions[name] = version

    def version(self, name: str) -> object:
        """The version of the shared entry; unchanged (the last one seen) while Redis is
        unreachable, so that nobody reloads or drops what it serves."""
        try:
            value = self._call(
                "poll", lambda: self._client.hget(self._key("cert", name), "version")
            )
        except redis.RedisError:
            return self._versions.get(name)
        return None if value is None else cast(bytes, value).decode()

    def claim_renewal(self, name: str) -> bool:
        """True while this instance holds the lock of `name` (taking it if free); False
        when another holds it or Redis does not answer."""
        held = self._held.get(name)
        lock = self._key("lock", name)
        try:
            if held is not None:
                if self._call("lock", lambda: self._client.get(lock)) == held.encode():
                    return True
                log.warning("storage: lost the renewal lock of %s to another instance", name)
                del self._held[name]
            now = f"{time.time():.3f}"
            args: list[str | int] = [self.instance, self._ttl_ms, now]
            keys = [lock, self._key("fence", name)]
            token = self._call("lock", lambda: self._acquire(keys=keys, args=args))
        except redis.RedisError:
            return held is not None  # keep trying as holder; the fenced write decides
        if not token:
            return False
        self._tokens[name] = str(int(cast(int, token)))
        self._held[name] = f"{self.instance}|{self._tokens[name]}|{now}"
        log.info("storage: %s holds the renewal lock of %s (token %s)", self.instance, name, token)
        return True

    def heartbeat(self) -> float | None:
        """Extend the leases of the locks held; the seconds until the next call."""
        for name, value in list(self._held.items()):
            try:
                extend = partial(
                    self._extend, keys=[self._key("lock", name)], args=[value, self._ttl_ms]
                )
                alive = self._call("heartbeat", extend)
            except redis.RedisError:
                continue
            if not alive:
                log.warning("storage: the renewal lock of %s expired; another may take it", name)
                self._held.pop(name, None)
        return self._ttl_ms / 3000

    def read_status(self, name: str) -> bytes | None:
        try:
            data = self._call("status", lambda: self._client.get(self._key("status", name)))
        except redis.RedisError:
            return self._cache.read_status(name)
        return cast(bytes | None, data)

    def write_status(self, name: str, data: bytes) -> None:
        self._cache.write_status(name, data)
        with contextlib.suppress(redis.RedisError):  # advice: the next save catches up
            self._call("status", lambda: self._client.set(self._key("status", name), data))

    def release(self, name: str) -> None:
        """Free the lock of `name` if this instance still holds it: the next claimant need
        not wait for the lease to run out."""
        value = self._held.pop(name, None)
        self._tokens.pop(name, None)
        if value is not None:
            release = partial(self._release, keys=[self._key("lock", name)], args=[value])
            with contextlib.suppress(redis.RedisError):  # then the lease runs out
                self._call("release", release)

    def names(self) -> list[str]:
        """RedisError propagates: a listing is all or nothing."""
        return self._listing("cert")

    def account(self, ident: str, proposed: bytes) -> bytes:
        """One script: store the (encrypted) proposal unless an account is there already."""
        bound = f"account:{ident}"
        keys, args = [self._key("account", ident)], [self._cipher.encrypt(bound, proposed)]
        try:
            stored = self._call("account", lambda: self._first_wins(keys=keys, args=args))
        except redis.RedisError as exc:
            raise StorageUnreachable(f"storage: Redis unreachable: {exc}") from exc
        return self._cipher.decrypt(bound, cast(bytes, stored))

    def accounts(self) -> dict[str, bytes]:
        idents = self._listing("account")
        if not idents:
            return {}
        keys = [self._key("account", ident) for ident in idents]
        sealed = cast(list[bytes | None], self._call("accounts", lambda: self._client.mget(keys)))
        return {
            ident: self._cipher.decrypt(f"account:{ident}", blob)
            for ident, blob in zip(idents, sealed, strict=True)
            if blob is not None  # unless deleted since the listing
        }

    def _listing(self, kind: str) -> list[str]:
        """What follows `<prefix><kind>:` in every such key (SCAN, glob characters escaped)."""
        head = self._key(kind, "")
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in head) + "*"
        keys = self._call(kind, lambda: list(self._client.scan_iter(match=pattern)))
        return sorted(cast(bytes, key).decode()[len(head) :] for key in keys)

    # -- shared view and challenges -------------------------------------------------------

    def lock_holder(self, name: str) -> tuple[str, datetime] | None:
        """Which instance holds the lock of `name`, and since when; None when free."""
        value = self._call("lock", lambda: self._client.get(self._key("lock", name)))
        if value is None:
            return None
        instance, _token, since = cast(bytes, value).decode().rsplit("|", 2)
        return instance, datetime.fromtimestamp(float(since), UTC)

    def publish_challenge(self, kind: str, ident: str, answer: bytes) -> None:
        """Let every instance answer the CA's validation for `ident`; RedisError propagates."""
        key = self._key("challenge", kind, ident)
        self._call("challenge", lambda: self._client.set(key, answer, ex=CHALLENGE_TTL))

    def challenge(self, kind: str, ident: str) -> bytes | None:
        """The answer another instance published; None when absent or Redis is unreachable."""
        key = self._key("challenge", kind, ident)
        try:
            return cast(bytes | None, self._call("challenge", lambda: self._client.get(key)))
        except redis.RedisError:
            return None

    def close(self) -> None:
        self._client.close()
