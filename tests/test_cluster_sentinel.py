"""Redis behind Sentinel (`sentinels` + `service_name`): real redis-server master and
replica, a real Sentinel (`redis-server --sentinel`), a failover, and the store following
it: what was written before is read from the new master, and locks and writes go on."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import trustme

from proxy.certs.redis_store import RedisStore
from proxy.certs.store import CertStore
from proxy.config import StorageConfig
from proxy.config_load import ConfigError, load_config
from tests.support.proxy import sites_toml
from tests.support.redisproc import RedisServer, run_redis, run_replica, run_sentinel

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
SERVICE = "port443-test"
BOUND = 20.0  # seconds for anything Sentinel does here


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {BOUND} s"
        time.sleep(0.1)


def _pair(host: str) -> tuple[bytes, bytes]:
    leaf = trustme.CA().issue_cert(host)
    return b"".join(pem.bytes() for pem in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


def _replica_count(sentinel: redis.Redis) -> int:
    replicas = sentinel.execute_command("SENTINEL", "REPLICAS", SERVICE)
    return len(replicas)


def _master_port(sentinel: redis.Redis) -> int:
    return int(sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])


def _role(server: RedisServer) -> str:
    return str(redis.Redis(port=server.port).info("replication")["role"])


def _retrying(call: Callable[[], bool]) -> bool:
    """`call`, once more if the first one met the old master (its connection is dropped)."""
    try:
        return call()
    except redis.RedisError:
        return call()


@pytest.mark.slow
def test_the_store_follows_a_sentinel_failover(tmp_path: Path) -> None:
    with (
        run_redis(tmp_path / "master") as master,
        run_replica(tmp_path / "replica", master) as replica,
        run_sentinel(tmp_path / "sentinel", master, SERVICE) as sentinel_server,
    ):
        config = StorageConfig(
            backend="redis",
            sentinels=(("127.0.0.1", sentinel_server.port),),
            service_name=SERVICE,
            encryption_key=KEY,
        )
        a = RedisStore(config, CertStore(tmp_path / "a"), instance="a")
        assert a.claim_renewal("a.test")
        chain, key = _pair("a.test")
        a.write("a.test", chain, key, {})
        direct = redis.Redis(port=master.port)
        assert direct.hexists("port443:cert:a.test", "chain")  # it went to the master
        assert direct.wait(1, 5000) == 1  # and reached the replica

        sentinel = redis.Redis(port=sentinel_server.port, decode_responses=True)
        _until(lambda: _replica_count(sentinel) == 1, "replica known to Sentinel")
        _until(
            lambda: _retrying(lambda: sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)),
            "failover started",
        )
        _until(lambda: _master_port(sentinel) == replica.port, "failover")
        _until(lambda: _role(replica) == "master", "promoted replica")
        _until(lambda: _role(master) == "slave", "old master demoted")  # no split brain

        b = RedisStore(config, CertStore(tmp_path / "b"), instance="b")
        loaded = b.load("a.test")
        assert loaded is not None and loaded.key_path.read_bytes() == key  # from the new master
        assert not b.claim_renewal("a.test")  # a's lock came along
        assert _retrying(lambda: a.claim_renewal("a.test"))  # still a's
        newer = _pair("a.test")
        # on a connection to the demoted master the write fails once and redis-py drops
        # it; a new connection asks Sentinel, and the write lands on the new master
        assert _retrying(lambda: a.write("a.test", *newer, {}) is None)
        assert redis.Redis(port=replica.port).hget("port443:cert:a.test", "chain") == newer[0]
        assert b.load("a.test").key_path.read_bytes() == newer[1]  # type: ignore[union-attr]
        a.close()
        b.close()
        sentinel.close()
        direct.close()


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        ('sentinels = ["127.0.0.1:26379"]\n', "sentinels and service_name go together"),
        (
            'url = "redis://127.0.0.1/0"\nsentinels = ["s1"]\nservice_name = "m"\n',
            "needs exactly one of url, sentinels",
        ),
        ('sentinels = ["s1:0"]\nservice_name = "m"\n', 'must be "host" or "host:port"'),
    ],
)
def test_sentinel_config_rules(tmp_path: Path, storage: str, problem: str) -> None:
    path = tmp_path / "port443.toml"
    path.write_text(
        f'[storage]\nbackend = "redis"\nencryption_key = "{KEY}"\n{storage}'
        + sites_toml((["a.test"], ["http://127.0.0.1:1"]))
    )
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(path)


def test_sentinels_are_read_with_default_ports(tmp_path: Path) -> None:
    path = tmp_path / "port443.toml"
    path.write_text(
        f'[storage]\nbackend = "redis"\nencryption_key = "{KEY}"\nservice_name = "m"\n'
        'sentinels = ["s1.internal", "10.0.0.2:26380", "[::1]:26381"]\n'
        + sites_toml((["a.test"], ["http://127.0.0.1:1"]))
    )
    storage = load_config(path).storage
    assert storage.sentinels == (("s1.internal", 26379), ("10.0.0.2", 26380), ("::1", 26381))
    assert storage.service_name == "m" and storage.url is None
