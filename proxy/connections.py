"""Client connections of one process: the limit, room made at it, the descriptor reserve, drain.

Every accepted connection holds a `Slot` for its life. The protocol object serving it (or, before
its TLS handshake completes, the server's handshake) registers as the slot's `Drainable` and
says when it is idle: waiting for a request head, or for a handshake. At the limit, the oldest
idle connections are closed to admit new clients, as nginx does with its keep-alive
connections, so idle or stalled clients cannot lock everybody else out.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import trio

from proxy.client_limits import ClientLimits
from proxy.lograte import RateLimitedLog

log = logging.getLogger(__name__)

EVICT_BATCH = 32  # idle connections closed at once at the descriptor reserve (nginx: 32)
RECOUNT_INTERVAL = 1.0  # seconds a count of open file descriptors is trusted
MIN_RECOUNT_INTERVAL = 0.1  # near the limit: recount no more often than this
RESERVE_RETRY = 0.1  # seconds between looks while the descriptor reserve is reached
EVICTION_SETTLE = 0.005  # seconds for evicted connections to close their sockets


class Drainable(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    def close_if_idle(self) -> None:
        """Shut a connection that is between requests; busy ones finish first."""


class Slot:
    """One accepted connection's place under the limit. A new connection is idle (nothing
    asked yet), so one whose task has not even started may be evicted: whatever registers
    for it afterwards is told to close at once."""

    __slots__ = ("_conn", "_registry", "evicted", "is_idle", "released")

    def __init__(self, registry: ConnectionRegistry) -> None:
        self._registry = registry
        self._conn: Drainable | None = None
        self.is_idle = False
        self.evicted = False  # closed to make room
        self.released = False  # closed, or evicted: no longer counted

    @property
    def draining(self) -> bool:
        return self._registry.draining

    def register(self, conn: Drainable) -> None:
        """`conn` serves this connection now (it is told to close on drain or eviction)."""
        self._conn = conn
        if self.evicted:
            conn.close_if_idle()

    def unregister(self, conn: Drainable) -> None:
        if self._conn is conn:
            self.busy()
            self._conn = None

    def idle(self) -> None:
        """Nothing in progress: the connection may be closed to make room, the longest idle
        first (a connection that is idle already keeps its place)."""
        if not (self.is_idle or self.released):
            self.is_idle = True
            registry = self._registry
            registry._idle[self] = None
            if registry._changed:  # the accept loop waits for a connection to close or idle
                registry._changed.unpark_all()

    def busy(self) -> None:
        if self.is_idle:
            self.is_idle = False
            self._registry._idle.pop(self, None)

    def evict(self) -> None:
        """Close this idle connection to make room; it stops counting now, though its socket
        closes a moment later."""
        self.evicted = True
        self.release()
        if self._conn is not None:
            self._conn.close_if_idle()

    def close_if_idle(self) -> None:
        if self._conn is not None:
            self._conn.close_if_idle()

    def end(self) -> None:
        """The connection's task is over and its socket closed."""
        self.release()
        self._registry.ended += 1

    def release(self) -> None:
        """The connection closed (or was evicted): it no longer counts. Once."""
        if not self.released:
            self.released = True
            self._registry._idle.pop(self, None)
            self._registry._released(self)


class ConnectionRegistry:
    """Open client connections of one listener group (the public ones, or the admin port).

    Draining is cooperative: idle connections are shut at once, busy ones see `draining`
    when their response ends and close instead of waiting for another request.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.draining = False
        self.evicted = 0  # idle connections closed to admit new ones, for the metrics
        self.ended = 0  # connections whose socket has closed (Slot.end), ever
        self._slots: set[Slot] = set()
        self._idle: OrderedDict[Slot, None] = OrderedDict()  # oldest first
        self._changed = trio.lowlevel.ParkingLot()  # a connection closed or went idle
        self._log_eviction = RateLimitedLog(log, logging.WARNING)

    @property
    def open_connections(self) -> int:
        return len(self._slots)

    @property
    def full(self) -> bool:
        return len(self._slots) >= self.max_connections

    def admit(self) -> Slot:
        slot = Slot(self)
        self._slots.add(slot)
        slot.idle()
        return slot

    def _released(self, slot: Slot) -> None:
        self._slots.discard(slot)
        if self._changed:
            self._changed.unpark_all()

    async def wait_for_room(self) -> None:
        """At the limit, close the oldest idle connection, one for each client admitted;
        with none idle, wait for one to close (new clients wait in the kernel backlog)."""
        while self.full:
            if not self.evict_idle(f"connection limit ({self.max_connections}) reached", 1):
                await self._changed.park()

    def evict_idle(self, reason: str, most: int) -> int:
        """Close up to `most` of the oldest idle connections. Returns how many."""
        evicted = 0
        while self._idle and evicted < most:
            slot = next(iter(self._idle))
            slot.evict()
            evicted += 1
        if evicted:
            self.evicted += evicted
            self._log_eviction("%s: closing %d idle connections", reason, evicted)
        return evicted

    async def wait_all_closed(self) -> None:
        while self._slots:
            await self._changed.park()

    def drain(self) -> None:
        self.draining = True
        for slot in list(self._slots):
            slot.close_if_idle()


def open_descriptors() -> int:
    """File descriptors this process has open now (Linux /proc; 0 where it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # without the one listdir used
    except OSError:
        return 0


class DescriptorReserve:
    """Keeps `reserve` file descriptors free under RLIMIT_NOFILE: past that, stop accepting,
    so the clients already accepted can still open their upstream connections and the
    admin listener still answers. Counting /proc/self/fd costs time in proportion to what is
    open, so a count is reused for a while: two descriptors added per accept since (a client
    and its upstream), one taken off per connection that ended since (its client socket).
    Near the limit it is redone at most every 100 ms, so it is these estimates that let
    clients in as fast as idle connections are closed for them."""

    def __init__(self, reserve: int, registry: ConnectionRegistry) -> None:
        self.reserve = reserve
        self.pauses = 0  # times accepting stopped at the reserve, for the metrics
        self._registry = registry
        self._counted = 0
        self._counted_at = -math.inf
        self._accepted_since = 0
        self._ended_before = 0  # registry.ended at the count
        self._log_pause = RateLimitedLog(log, logging.WARNING)

    def admits(self) -> bool:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return True
        age = time.monotonic() - self._counted_at
        if age >= RECOUNT_INTERVAL or (not self._within(soft) and age >= MIN_RECOUNT_INTERVAL):
            self._counted, self._accepted_since = open_descriptors(), 0
            self._ended_before = self._registry.ended
            self._counted_at = time.monotonic()
        return self._within(soft)

    def _within(self, soft: int) -> bool:
        ended_since = self._registry.ended - self._ended_before
        return self._counted + 2 * self._accepted_since - ended_since + self.reserve < soft

    def accepted(self) -> None:
        self._accepted_since += 1

    async def wait(self) -> None:
        """Until accepting stays within the reserve, closing idle connections meanwhile: a
        batch, then a moment for their sockets to close, then another look."""
        if self.admits():
            return
        self.pauses += 1
        reason = f"fewer than {self.reserve} file descriptors left"
        self._log_pause("%s (%d open): not accepting for now", reason, self._counted)
        while True:
            evicted = self._registry.evict_idle(reason, EVICT_BATCH)
            await trio.sleep(EVICTION_SETTLE if evicted else RESERVE_RETRY)
            if self.admits():
                return


@dataclass(frozen=True, kw_only=True)
class Admission:
    """What an accept loop asks before serving a client: the public listeners use all three,
    the admin port only its own registry (it may use the descriptors reserved for it)."""

    registry: ConnectionRegistry
    reserve: DescriptorReserve | None = None
    clients: ClientLimits | None = None
