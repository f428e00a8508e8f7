"""Deadlines on raw-socket waits: enforced by the reaper, per direction, without cancel scopes."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.netio import REAPER_TICK, SocketStream, StreamTimeout


async def test_receive_times_out_near_its_deadline() -> None:
    left, right = socket.socketpair()
    with left, right:
        stream = SocketStream(left)
        start = trio.current_time()
        with pytest.raises(StreamTimeout):
            await stream.receive_some(start + 0.3)
        waited = trio.current_time() - start
        assert 0.3 <= waited <= 0.3 + 2 * REAPER_TICK
        # A stream that timed out is gone: no later call can use it by mistake.
        assert left.fileno() == -1
        with pytest.raises(OSError):
            await stream.receive_some()


async def test_reader_deadline_does_not_disturb_a_later_writer_deadline() -> None:
    left, right = socket.socketpair()
    with left, right:
        stream = SocketStream(left)
        right.setblocking(False)
        results: dict[str, object] = {}

        async def reader() -> None:
            try:
                await stream.receive_some(trio.current_time() + 0.3)
            except StreamTimeout:
                results["reader"] = "timeout"

        async def writer() -> None:
            # Fill the socket buffer so the writer blocks, with a far deadline.
            try:
                await stream.send_all(b"x" * 8_000_000, trio.current_time() + 30)
                results["writer"] = "sent"
            except OSError as exc:
                results["writer"] = type(exc).__name__

        async def drain_later() -> None:
            await trio.sleep(1.0)
            while True:
                await trio.lowlevel.wait_readable(right)
                try:
                    if not right.recv(1 << 20):
                        return
                except BlockingIOError:
                    continue
                if "writer" in results:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
            nursery.start_soon(drain_later)
        assert results["reader"] == "timeout"
        # The reaper wakes every waiter of a socket; the writer, not overdue, is told the
        # socket was closed under it (ConnectionAbortedError), never a false timeout.
        assert results["writer"] in ("sent", "ConnectionAbortedError")
