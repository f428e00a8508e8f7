"""An on-demand TLS `ask` endpoint for tests (trio + h11): GET /check?domain=<name> answers
200 for the names in `approved`, 403 for any other; every name asked for is recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio


@dataclass
class AskEndpoint:
    approved: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)  # the domain of each request, in order
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/check"


async def _answer(stream: trio.SocketStream, endpoint: AskEndpoint) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Request):
                query = parse_qs(urlsplit(event.target.decode()).query)
                domain = query.get("domain", [""])[0]
                endpoint.asked.append(domain)
                status = 200 if domain in endpoint.approved else 403
                response = h11.Response(status_code=status, headers=[("content-length", "0")])
                data = (conn.send(response) or b"") + (conn.send(h11.EndOfMessage()) or b"")
                await stream.send_all(data)
            elif isinstance(event, h11.EndOfMessage):
                conn.start_next_cycle()
            else:
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return
    finally:
        await stream.aclose()


async def serve_ask(
    endpoint: AskEndpoint, *, task_status: trio.TaskStatus[AskEndpoint] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    endpoint.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _answer(s, endpoint), listeners)
        task_status.started(endpoint)
