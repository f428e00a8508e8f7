"""An on-demand TLS `ask` endpoint for tests (served by tiny_http): GET /check?domain=<name>
answers 200 for the names in `approved`, 403 for any other; every name asked for is recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from tests.support.tiny_http import Reply, serve_http


@dataclass
class AskEndpoint:
    approved: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)  # the domain of each request, in order
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/check"

    async def answer(self, request: h11.Request, body: bytes) -> Reply:
        query = parse_qs(urlsplit(request.target.decode()).query)
        domain = query.get("domain", [""])[0]
        self.asked.append(domain)
        return 200 if domain in self.approved else 403, [], b""


async def serve_ask(
    endpoint: AskEndpoint, *, task_status: trio.TaskStatus[AskEndpoint] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        endpoint.port = await nursery.start(serve_http, endpoint.answer)
        task_status.started(endpoint)
