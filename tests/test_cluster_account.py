"""One ACME account for every instance sharing a Redis: three ACME clients, each with its
own certs directory (as three machines), register at a real Pebble at the same moment;
the first proposal stored in Redis is every instance's account, and Pebble creates one."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from proxy.certs.acme import AcmeClient
from proxy.certs.redis_store import RedisStore
from proxy.certs.store import CertStore
from proxy.config import StorageConfig
from tests.support.net import free_port
from tests.support.pebble import Pebble
from tests.support.redisproc import RedisServer, run_redis

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as server:
        yield server


def _client(pebble: Pebble, server: RedisServer, certs: Path) -> AcmeClient:
    storage = StorageConfig(backend="redis", url=server.url, encryption_key=KEY)
    store = RedisStore(storage, CertStore(certs), instance=certs.name)
    return AcmeClient(certs, pebble.directory, ca_bundle=pebble.ca_bundle, accounts=store)


async def test_three_instances_register_one_account(
    tmp_path: Path, start_pebble: Callable[..., Pebble], server: RedisServer
) -> None:
    pebble = start_pebble(http_port=free_port(), tls_port=free_port())
    clients = [_client(pebble, server, tmp_path / name) for name in ("a", "b", "c")]
    uris: list[str] = []

    async def register(client: AcmeClient) -> None:
        uris.append(await client.account_uri())

    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(register, client)
    assert len(uris) == 3 and len(set(uris)) == 1, uris
    keys = {json.dumps(json.loads(c.account_path.read_bytes())["key"]) for c in clients}
    assert len(keys) == 1  # each instance's copy holds the one shared key
    log = (tmp_path / "pebble-0" / "pebble.log").read_text()
    assert log.count("There are now 1 accounts in memory") == 1, log
    assert "There are now 2 accounts" not in log, log

    later = _client(pebble, server, tmp_path / "d")  # an instance added afterwards
    assert await later.account_uri() == uris[0]
