"""A tiny demo backend for `make run`: answers every request with what it received.

It shows what the proxy adds (X-Forwarded-*, Via) without installing anything else. Any
request gets an answer (HEAD without a body, a malformed one a 400) and a connection's
failure never takes the server down.
Run: python -m proxy.demo [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial

import h11
import trio

log = logging.getLogger("proxy.demo")


def _echo(request: h11.Request, body_length: int) -> bytes:
    received = {
        "method": request.method.decode("latin-1"),
        "target": request.target.decode("latin-1"),
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers},
        "body_length": body_length,
    }
    return (json.dumps(received, indent=2) + "\n").encode()


async def _respond(
    stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes, head_only: bool
) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if not head_only:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _exchanges(stream: trio.SocketStream, conn: h11.Connection) -> None:
    """Answer requests one after another until the client closes."""
    request: h11.Request | None = None
    body_length = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request, body_length = event, 0
        elif isinstance(event, h11.Data):
            body_length += len(event.data)
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            body = _echo(request, body_length)
            await _respond(stream, conn, 200, body, head_only=request.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
        else:  # ConnectionClosed
            return


async def _serve(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        try:
            await _exchanges(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                message = json.dumps({"error": str(exc)}).encode() + b"\n"
                await _respond(stream, conn, exc.error_status_hint, message, head_only=False)
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("demo backend: connection ended: %r", exc)
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"demo backend on http://{args.host}:{args.port}/", flush=True)
    trio.run(partial(trio.serve_tcp, _serve, args.port, host=args.host))


if __name__ == "__main__":
    main()
