"""The hand-over between the supervisor and a worker process, and their control channel.

A worker is `python -m proxy run` started with `PORT443_WORKER` in its environment: which
inherited file descriptors are its listeners and its control socket, and the session-ticket
keys in force (the environment of a process is readable by its user and root only; nothing
of it touches the disk). Over the control socket travel newline-delimited JSON messages: the
supervisor asks for the worker's metrics, readiness and traffic history (the status page)
and sends rotated ticket keys; the supervisor's end closing tells the worker to shut down
(the supervisor is gone).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from proxy.handlers.admin import ProcessView
from proxy.server import Listeners
from proxy.tls.policy import set_ticket_keys

log = logging.getLogger(__name__)

WORKER_ENV = "PORT443_WORKER"
MAX_MESSAGE = 64 * 1024 * 1024  # a metrics exposition of many sites fits easily

Message = dict[str, Any]


@dataclass(frozen=True)
class WorkerSpec:
    index: int  # 1..N, stable across restarts: names the worker in logs
    listeners: tuple[tuple[int, str], ...]  # (inherited fd, "https" or "http")
    control: int  # inherited fd of the control socket
    ticket_keys: tuple[bytes, ...]  # newest first

    def to_env(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "listeners": [list(pair) for pair in self.listeners],
                "control": self.control,
                "ticket_keys": [key.hex() for key in self.ticket_keys],
            }
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WorkerSpec | None:
        """The spec a supervisor handed this process, or None when it runs on its own."""
        raw = environ.get(WORKER_ENV)
        if raw is None:
            return None
        data = json.loads(raw)
        return cls(
            index=int(data["index"]),
            listeners=tuple((int(fd), str(kind)) for fd, kind in data["listeners"]),
            control=int(data["control"]),
            ticket_keys=tuple(bytes.fromhex(key) for key in data["ticket_keys"]),
        )

    def adopt(self) -> tuple[Listeners, trio.socket.SocketType]:
        """Take over the inherited sockets (and install the ticket keys before any TLS
        context is built); the environment entry is dropped so children do not see it."""
        os.environ.pop(WORKER_ENV, None)
        set_ticket_keys(self.ticket_keys)
        listeners: Listeners = []
        for fd, kind in self.listeners:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            listeners.append((sock, kind))
        control = trio.socket.from_stdlib_socket(socket.socket(fileno=self.control))
        return listeners, control


class Channel:
    """Newline-delimited JSON messages over a connected stream socket, one reader."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: Message) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._send_lock:
            view = memoryview(data)
            while view:
                sent = await self._sock.send(view)
                view = view[sent:]

    async def receive(self) -> Message | None:
        """The next message, or None when the other end has closed."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                message: Message = json.loads(line)
                return message
            if len(self._buffer) > MAX_MESSAGE:
                raise ValueError("control message too long")
            chunk = await self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        self._sock.close()


async def answer_supervisor(
    channel: Channel, view: ProcessView, on_orphaned: Callable[[], None]
) -> None:
    """The worker's side: answer status requests, take rotated ticket keys; when the
    supervisor's end closes (it died), call `on_orphaned` so the worker drains and exits."""
    while True:
        try:
            message = await channel.receive()
        except (OSError, ValueError) as exc:
            log.error("control channel to the supervisor broke: %s", exc)
            message = None
        if message is None:
            log.warning("the supervisor is gone: shutting down")
            on_orphaned()
            return
        op = message.get("op")
        if op == "status":
            metrics = (await view.exposition()).decode()
            reason = await view.unready_reason()
            traffic = view.traffic()
            answer = {"id": message.get("id"), "unready": reason, "metrics": metrics}
            await channel.send({**answer, "traffic": traffic})
        elif op == "ticket_keys":
            set_ticket_keys(tuple(bytes.fromhex(key) for key in message["keys"]))
        else:
            log.error("unknown control message %r", op)
