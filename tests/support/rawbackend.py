"""A scripted HTTP/1.1 upstream that writes raw bytes: the malformed, ambiguous or cut-off
responses that no well-behaved server library would produce.

`respond(path, nth)` decides the answer to the nth request (from 1) on a connection: the
bytes to write and whether to close afterwards. `/clean` always gets a well-formed response
naming the request, so a test sees at once whether it got its own answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

Answer = tuple[bytes, bool]  # bytes to write, close the connection afterwards
Script = Callable[[bytes, int], Answer]


def clean_response(path: bytes, nth: int) -> bytes:
    body = b"clean " + path + b" #%d" % nth
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class RawBackend:
    script: Script
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # paths, in arrival order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[RawBackend]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        nth = 0
        async with stream:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")  # requests carry no body
                    path = head.split(b" ", 2)[1]
                    self.requests.append(path)
                    nth += 1
                    if path == b"/clean":
                        answer: Answer = (clean_response(path, nth), False)
                    else:
                        answer = self.script(path, nth)
                    data, close = answer
                    if data:
                        await stream.send_all(data)
                    if close:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
