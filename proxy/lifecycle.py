"""Connection bookkeeping shared by the listeners: the limit, and draining on shutdown."""

from __future__ import annotations

from typing import Protocol

import trio


class Drainable(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    def close_if_idle(self) -> None:
        """Shut a connection that is between requests; busy ones finish first."""


class Lifecycle:
    """Tracks open client connections for one process.

    Draining is cooperative: idle connections are shut at once, busy ones see `draining`
    when their response ends and close instead of waiting for another request.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.draining = False
        self._connections: set[Drainable] = set()
        self._count = 0
        self._changed = trio.Event()

    @property
    def open_connections(self) -> int:
        return self._count

    async def wait_for_capacity(self) -> None:
        """Block accepting while at the limit: excess clients wait in the kernel backlog."""
        while self._count >= self.max_connections:
            await self._changed.wait()

    async def wait_all_closed(self) -> None:
        while self._count:
            await self._changed.wait()

    def opened(self) -> None:
        self._count += 1

    def closed(self) -> None:
        self._count -= 1
        self._changed.set()
        self._changed = trio.Event()

    def register(self, conn: Drainable) -> None:
        self._connections.add(conn)

    def unregister(self, conn: Drainable) -> None:
        self._connections.discard(conn)

    def drain(self) -> None:
        self.draining = True
        for conn in list(self._connections):
            conn.close_if_idle()
