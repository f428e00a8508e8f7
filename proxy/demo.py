"""A tiny demo backend for `make run`: answers every request with what it received.

It shows what the proxy adds (X-Forwarded-*, Via) without installing anything else.
Run: python -m proxy.demo [--port 8000]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import h11
import trio


async def _serve(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            received = {
                "method": event.method.decode(),
                "target": event.target.decode(),
                "headers": {k.decode(): v.decode() for k, v in event.headers},
            }
            body = (json.dumps(received, indent=2) + "\n").encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        elif isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return
        elif isinstance(event, h11.ConnectionClosed):
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(f"demo backend on http://{args.host}:{args.port}/", flush=True)
    trio.run(partial(trio.serve_tcp, _serve, args.port, host=args.host))


if __name__ == "__main__":
    main()
