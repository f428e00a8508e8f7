"""The Redis certificate store against a real redis-server: fencing, leases, encryption at
rest, challenges shared between instances, and a store that keeps serving while Redis is
down. Each `RedisStore` here stands for one instance (its own cache directory)."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from proxy.certs import acme_challenges
from proxy.certs.redis_store import LockLost, RedisStore
from proxy.certs.status import RenewalStatus, load_status, save_status
from proxy.certs.store import CertStore
from proxy.config import StorageConfig
from tests.support.redisproc import RedisServer, run_redis

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.urlsafe_b64encode(bytes(32)).decode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as server:
        yield server


def _store(
    server: RedisServer, directory: Path, *, key: str = KEY, ttl: float = 30.0
) -> RedisStore:
    config = StorageConfig(backend="redis", url=server.url, encryption_key=key, lock_ttl=ttl)
    return RedisStore(config, CertStore(directory), instance=directory.name)


def _pair(ca: trustme.CA, host: str = "a.test") -> tuple[bytes, bytes]:
    leaf = ca.issue_cert(host)
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


def test_one_holder_and_its_result_reaches_the_others(server: RedisServer, tmp_path: Path) -> None:
    a, b = _store(server, tmp_path / "a"), _store(server, tmp_path / "b")
    assert a.claim_renewal("a.test")
    assert not b.claim_renewal("a.test")
    assert a.lock_holder("a.test") is not None
    assert a.lock_holder("a.test")[0] == "a"  # type: ignore[index]
    before = b.version("a.test")
    chain, key = _pair(trustme.CA())
    a.write("a.test", chain, key, {"issuer": "test"})
    assert b.version("a.test") != before
    loaded = b.load("a.test")
    assert loaded is not None and loaded.meta["issuer"] == "test"
    assert loaded.serial == a.load("a.test").serial  # type: ignore[union-attr]
    assert loaded.key_path.read_bytes() == key  # the follower's local copy serves it


def test_private_keys_are_encrypted_at_rest(server: RedisServer, tmp_path: Path) -> None:
    a = _store(server, tmp_path / "a")
    assert a.claim_renewal("a.test")
    chain, key = _pair(trustme.CA())
    a.write("a.test", chain, key, {})
    raw = redis.Redis.from_url(server.url).hget("port443:cert:a.test", "key")
    assert raw is not None and b"PRIVATE KEY" not in raw
    assert _store(server, tmp_path / "wrong", key=OTHER_KEY).load("a.test") is None


def test_a_paused_holder_cannot_overwrite_a_newer_certificate(
    server: RedisServer, tmp_path: Path
) -> None:
    """The holder's lease runs out (no heartbeat: it is paused), another takes the lock and
    writes; the first one's late write is refused by the fencing token."""
    paused, other = _store(server, tmp_path / "a", ttl=1), _store(server, tmp_path / "b", ttl=1)
    assert paused.claim_renewal("a.test")
    time.sleep(1.2)
    assert other.claim_renewal("a.test")
    newer = _pair(trustme.CA())
    other.write("a.test", *newer, {})
    with pytest.raises(LockLost):
        paused.write("a.test", *_pair(trustme.CA()), {})
    assert not paused.claim_renewal("a.test")
    assert paused.load("a.test").key_path.read_bytes() == newer[1]  # type: ignore[union-attr]


def test_a_lapsed_lease_nobody_took_over_still_lets_the_result_in(
    server: RedisServer, tmp_path: Path
) -> None:
    """The fencing token decides, not the lease: an order finished after the lease ran
    out is not wasted while no other instance has taken the lock."""
    holder = _store(server, tmp_path / "a", ttl=1)
    assert holder.claim_renewal("a.test")
    time.sleep(1.2)
    assert holder.heartbeat() is not None  # notices the lease is gone
    assert holder.lock_holder("a.test") is None
    chain, key = _pair(trustme.CA())
    holder.write("a.test", chain, key, {})
    assert _store(server, tmp_path / "b").load("a.test").key_path.read_bytes() == key  # type: ignore[union-attr]
    with pytest.raises(LockLost):
        _store(server, tmp_path / "c").write("a.test", chain, key, {})  # never held it


def test_the_heartbeat_keeps_the_lock_past_its_ttl(server: RedisServer, tmp_path: Path) -> None:
    holder, other = _store(server, tmp_path / "a", ttl=1), _store(server, tmp_path / "b", ttl=1)
    assert holder.claim_renewal("a.test")
    for _ in range(4):
        interval = holder.heartbeat()
        assert interval is not None and interval < 1
        time.sleep(interval)
    assert not other.claim_renewal("a.test")
    assert holder.claim_renewal("a.test")


def test_redis_down_serves_the_local_copy_and_deletes_nothing(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = _store(server, tmp_path / "a"), _store(server, tmp_path / "b")
    assert a.claim_renewal("a.test")
    a.write("a.test", *_pair(trustme.CA()), {})
    serial = b.load("a.test").serial  # type: ignore[union-attr]
    save_status(b, "a.test", RenewalStatus(hosts=("a.test",), failures=2))
    version = b.version("a.test")
    server.stop()
    with caplog.at_level(logging.INFO, logger="proxy.certs.redis_store"):
        assert b.load("a.test").serial == serial  # type: ignore[union-attr]
        assert b.version("a.test") == version  # unchanged: nobody reloads or drops
        assert not b.claim_renewal("a.test")
        assert load_status(b, "a.test").failures == 2
        assert b.unreachable_since is not None
        with pytest.raises(redis.RedisError):
            a.write("a.test", *_pair(trustme.CA()), {})
        server.start()  # empty (no persistence): the lock is free, the local copies stay
        assert b.claim_renewal("a.test")  # renewals resume
    assert b.unreachable_since is None
    assert CertStore(tmp_path / "b").load("a.test").serial == serial  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unreachable" in m for m in messages) == 2  # once per instance, not per call
    assert any("reachable again" in m for m in messages)
    assert not [r for r in caplog.records if r.exc_info]  # log lines, never tracebacks


def test_any_instance_answers_a_challenge_another_started(
    server: RedisServer, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        acme_challenges.share_challenges(directory, _store(server, directory))
    try:
        acme_challenges.write_http01(first, "tok-1", "tok-1.thumb")
        assert acme_challenges.http01_key_authorization(second, "tok-1") == b"tok-1.thumb"
        assert acme_challenges.http01_key_authorization(second, "other") is None
        acme_challenges.write_tls_alpn01(first, "a.test", "tok-2.thumb")
        contexts = acme_challenges.TlsAlpn01Contexts(second)
        assert contexts.context_for("a.test") is not None
        assert contexts.context_for("b.test") is None
    finally:
        for directory in (first, second):
            acme_challenges.share_challenges(directory, None)
