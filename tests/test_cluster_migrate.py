"""`port443 storage migrate` between a certs directory and a real redis-server, and the
shared view of `port443 certs`: what is copied, that nothing newer is replaced, that a
second run copies nothing, and that a certificate whose lock a running instance holds
is left to it."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from proxy.certs.migrate import COPIED, KEPT, SKIPPED, WOULD_COPY, migrate
from proxy.certs.redis_store import RedisStore
from proxy.certs.store import CertStore
from proxy.config import StorageConfig
from tests.support.redisproc import RedisServer, run_redis
from tests.support.run import port443

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
ACCOUNT = b'{"directory": "https://ca.test/dir", "uri": null, "key": {"kty": "EC"}}'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as server:
        yield server


def _redis(server: RedisServer, cache: Path, instance: str = "other") -> RedisStore:
    config = StorageConfig(backend="redis", url=server.url, encryption_key=KEY)
    return RedisStore(config, CertStore(cache), instance=instance)


def _pair(host: str, days: int) -> tuple[bytes, bytes]:
    """A certificate for `host` expiring in about `days` days, and its key."""
    leaf = trustme.CA().issue_cert(host, not_after=datetime.now(UTC) + timedelta(days=days))
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


def _directory(root: Path) -> CertStore:
    """A directory store with two certificates, a renewal plan and an ACME account."""
    store = CertStore(root)
    for host in ("a.test", "b.test"):
        store.write(host, *_pair(host, 60), {"issuer": "acme", "hosts": [host]})
    store.write_status("a.test", b'{"failures": 1}')
    store.account("ca.test", ACCOUNT)
    return store


def _config(tmp_path: Path, server: RedisServer) -> Path:
    path = tmp_path / "redis.toml"
    path.write_text(
        f'[certs]\ndir = "{tmp_path / "instance"}"\n'
        f'[storage]\nbackend = "redis"\nurl = "{server.url}"\nencryption_key = "{KEY}"\n'
        '[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n'
        '[[sites]]\nhosts = ["b.test"]\nupstreams = ["http://127.0.0.1:1"]\n'
    )
    return path


def test_a_directory_moves_into_redis_once_and_the_instances_see_it(
    server: RedisServer, tmp_path: Path
) -> None:
    source = _directory(tmp_path / "certs")
    config = _config(tmp_path, server)

    dry = port443(
        "storage", "migrate", "--from", str(source.root), "--to", str(config), "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(WOULD_COPY) == 3, dry.stdout  # two certificates, one account
    instance = _redis(server, tmp_path / "instance-cache")
    assert instance.names() == [] and instance.accounts() == {}

    first = port443("storage", "migrate", "--from", str(source.root), "--to", str(config))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(f": {COPIED} (") == 3, first.stdout
    assert instance.names() == ["a.test", "b.test"]
    for name in ("a.test", "b.test"):
        shared, local = instance.load(name), source.load(name)
        assert shared is not None and local is not None
        assert shared.serial == local.serial
        assert shared.key_path.read_bytes() == local.key_path.read_bytes()
    assert instance.read_status("a.test") == b'{"failures": 1}'
    assert instance.accounts() == {"ca.test": ACCOUNT}
    assert instance.lock_holder("a.test") is None  # the migration freed its locks
    assert not (tmp_path / "instance").exists()  # the instance's own copy was left alone

    again = port443("storage", "migrate", "--from", str(source.root), "--to", str(config))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(f": {KEPT} (") == 3, again.stdout

    shown = port443("certs", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "LOCK HOLDER" in shown.stdout and "none yet" not in shown.stdout


def test_a_newer_certificate_is_never_replaced(server: RedisServer, tmp_path: Path) -> None:
    source = _directory(tmp_path / "certs")
    target = _redis(server, tmp_path / "cache")
    assert target.claim_renewal("a.test")
    newer = _pair("a.test", 80)
    target.write("a.test", *newer, {"issuer": "acme"})
    target.release("a.test")

    steps = {step.item: step for step in migrate(source, target, dry_run=False)}
    assert steps["certificate a.test"].action == KEPT
    assert steps["certificate b.test"].action == COPIED
    assert target.load("a.test").key_path.read_bytes() == newer[1]  # type: ignore[union-attr]
    assert target.read_status("a.test") is None  # the plan travels only with its certificate

    back = CertStore(tmp_path / "back")  # and back: Redis into an empty directory
    steps = {step.item: step for step in migrate(target, back, dry_run=False)}
    assert {step.action for step in steps.values()} == {COPIED}
    assert back.load("a.test").key_path.read_bytes() == newer[1]  # type: ignore[union-attr]
    assert back.accounts() == {"ca.test": ACCOUNT}
    assert "store_version" not in back.load("b.test").meta  # type: ignore[union-attr]


def test_a_certificate_locked_by_a_running_instance_is_left_to_it(
    server: RedisServer, tmp_path: Path
) -> None:
    source = _directory(tmp_path / "certs")
    running = _redis(server, tmp_path / "running", instance="host-1:42")
    assert running.claim_renewal("a.test")
    config = _config(tmp_path, server)

    result = port443("storage", "migrate", "--from", str(source.root), "--to", str(config))
    assert result.returncode == 1
    assert f"certificate a.test: {SKIPPED} (its lock is held; run again later)" in result.stdout
    assert running.names() == ["b.test"]
    assert running.claim_renewal("a.test")  # still the holder

    shown = port443("certs", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    locks = shown.stdout.split("LOCK HOLDER")[1].splitlines()[1:]
    assert locks[0].split()[:3] == ["a.test", "host-1:42", datetime.now(UTC).strftime("%Y-%m-%d")]
    assert locks[1].split() == ["b.test", "free", "-"]
