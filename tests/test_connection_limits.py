"""The connection registry, per-client limits and the descriptor reserve, in process."""

from __future__ import annotations

import logging
import resource

import pytest
import trio

from proxy import client_limits, connections, lograte
from proxy.client_limits import ClientLimits, client_key
from proxy.config import LimitsConfig
from proxy.connections import ConnectionRegistry, DescriptorReserve, Slot


class Conn:
    def __init__(self, slot: Slot) -> None:
        self.closed = False
        slot.register(self)

    def close_if_idle(self) -> None:
        self.closed = True


def test_the_longest_idle_connection_is_closed_first_and_busy_ones_never() -> None:
    registry = ConnectionRegistry(3)
    slots = [registry.admit() for _ in range(3)]
    conns = [Conn(slot) for slot in slots]
    slots[0].busy()  # a request in progress
    slots[1].busy()
    slots[1].idle()  # idle again after its response: now the most recent
    assert registry.full
    assert registry.evict_idle("test", 1) == 1
    assert [c.closed for c in conns] == [False, False, True]
    assert registry.open_connections == 2 and not registry.full and registry.evicted == 1
    assert registry.evict_idle("test", 5) == 1  # only slots[1] is idle now
    assert [c.closed for c in conns] == [False, True, True]
    assert registry.evict_idle("test", 5) == 0
    slots[0].release()
    assert registry.open_connections == 0


def test_a_slot_evicted_before_its_connection_registers_closes_it_at_once() -> None:
    registry = ConnectionRegistry(1)
    slot = registry.admit()  # a new connection is idle: nothing asked yet
    registry.evict_idle("test", 1)
    assert slot.evicted and registry.open_connections == 0
    slot.idle()  # too late to count as idle again
    assert registry.evict_idle("test", 1) == 0
    assert Conn(slot).closed
    slot.release()  # its task ends: nothing counted twice
    assert registry.open_connections == 0


async def test_waiting_for_room_wakes_when_a_connection_goes_idle() -> None:
    registry = ConnectionRegistry(1)
    slot = registry.admit()
    conn = Conn(slot)
    slot.busy()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.wait_for_room)
            await trio.sleep(0.05)
            assert not conn.closed
            slot.idle()
    assert conn.closed and not registry.full


def test_drain_tells_every_registered_connection() -> None:
    registry = ConnectionRegistry(5)
    conns = [Conn(registry.admit()) for _ in range(3)]
    registry.drain()
    assert registry.draining and all(c.closed for c in conns)


def test_ipv6_clients_count_by_their_slash_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_token_bucket_allows_the_burst_then_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(client_limits.time, "monotonic", lambda: now[0])
    limits = ClientLimits(LimitsConfig(requests_per_second_per_ip=2, request_burst_per_ip=3))
    a, b = "192.0.2.1", "192.0.2.2"
    assert [limits.retry_after(a) for _ in range(3)] == [None, None, None]
    assert limits.retry_after(a) == 1  # one token comes back in 0.5 s: Retry-After rounds up
    assert limits.retry_after(b) is None  # another client has its own bucket
    now[0] += 0.5
    assert limits.retry_after(a) is None
    assert limits.retry_after(a) == 1
    now[0] += 60  # refills to the burst, no further
    assert [limits.retry_after(a) for _ in range(4)] == [None, None, None, 1]
    assert limits.refused_requests == 3


def test_off_by_default_and_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = ClientLimits(LimitsConfig())
    assert all(limits.retry_after("192.0.2.1") is None for _ in range(1000))
    assert all(limits.connection_opened("192.0.2.1") for _ in range(1000))
    monkeypatch.setattr(client_limits, "MAX_BUCKETS", 10)
    limits.configure(LimitsConfig(requests_per_second_per_ip=1, request_burst_per_ip=1))
    for n in range(50):
        limits.retry_after(f"10.0.0.{n}")
    assert len(limits._buckets) == 10


def test_connections_per_client() -> None:
    limits = ClientLimits(LimitsConfig(max_connections_per_ip=2))
    assert limits.connection_opened("a") and limits.connection_opened("a")
    assert not limits.connection_opened("a")
    assert limits.connection_opened("b")
    limits.connection_closed("a")
    assert limits.connection_opened("a")
    for key in ("a", "a", "b"):
        limits.connection_closed(key)
    assert limits._connections == {} and limits.refused_connections == 1


def test_descriptor_reserve_counts_accepts_and_closes_until_it_recounts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    open_fds = [100]
    monkeypatch.setattr(connections.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(connections, "open_descriptors", lambda: open_fds[0])
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (200, 200))
    registry = ConnectionRegistry(10000)
    reserve = DescriptorReserve(64, registry)
    assert reserve.admits()  # 100 open + 64 reserved < 200
    slots = [registry.admit() for _ in range(18)]
    for _ in slots:
        reserve.accepted()  # each may bring an upstream connection: counted twice
    assert not reserve.admits()  # 100 + 36 + 64: no more, until a recount or a close
    slots[0].evict()
    assert not reserve.admits()  # evicted, but its socket is not closed yet
    slots[0].end()
    assert reserve.admits()  # 100 + 36 - 1 + 64 < 200: the closed client socket is free
    reserve.accepted()
    assert not reserve.admits()
    open_fds[0] = 120
    now[0] += connections.MIN_RECOUNT_INTERVAL
    assert reserve.admits()  # the recount: 120 + 64 < 200
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    open_fds[0] = 10**9
    assert reserve.admits()


class EndingConn(Conn):
    """Closes its socket when told, as a connection's task does (`Slot.end`)."""

    def __init__(self, slot: Slot) -> None:
        super().__init__(slot)
        self.slot = slot

    def close_if_idle(self) -> None:
        super().close_if_idle()
        self.slot.end()


async def test_at_the_reserve_clients_are_let_in_as_soon_as_idle_ones_have_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections, "open_descriptors", lambda: 150)  # never recounted lower
    monkeypatch.setattr(connections.time, "monotonic", lambda: 0.0)  # no recount: however slow
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (200, 200))
    registry = ConnectionRegistry(10000)
    reserve = DescriptorReserve(64, registry)
    conns = [EndingConn(registry.admit()) for _ in range(100)]
    assert not reserve.admits()  # 150 + 64 reserved > 200
    with trio.fail_after(5):
        await reserve.wait()
    assert sum(c.closed for c in conns) == connections.EVICT_BATCH  # one batch was enough
    assert reserve.admits() and reserve.pauses == 1


def test_rate_limited_log_folds_repeats(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    monkeypatch.setattr(lograte.time, "monotonic", lambda: now[0])
    line = lograte.RateLimitedLog(logging.getLogger("test.lograte"), logging.WARNING, 10)
    with caplog.at_level(logging.WARNING, "test.lograte"):
        for _ in range(5):
            line("flood from %s", "x")
        now[0] += 10
        line("flood from %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "flood from x",
        "flood from y (and 4 more since the last such line)",
    ]
