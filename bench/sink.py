#!/usr/bin/env python3
"""The backend of the 1 GB streaming runs: `sink.py PORT` on 127.0.0.1, HTTP/1.1 keep-alive.

    GET /ping      -> 200 "ok"
    GET /bytes/N   -> 200 with N zero bytes (Content-Length), sent from one 1 MiB buffer
    PUT or POST    -> reads the Content-Length body into one reused buffer, 200 "<bytes read>"

nginx cannot generate a 1 GB body without a file, and answers an upload before reading it;
this sink keeps its own memory flat so that only the proxy's RSS moves.
"""

from __future__ import annotations

import socket
import sys
import threading

CHUNK = memoryview(bytearray(1 << 20))


def _respond(conn: socket.socket, status: str, body: bytes) -> None:
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode("ascii") + body)


def _serve(conn: socket.socket) -> None:
    buf = memoryview(bytearray(1 << 20))
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
            head, _, pending = pending.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
            }
            if "chunked" in headers.get("transfer-encoding", "").lower():
                _respond(conn, "501 Not Implemented", b"chunked request bodies are not read here\n")
                return
            remaining = int(headers.get("content-length", "0")) - len(pending)
            received = len(pending)
            pending = b""
            while remaining > 0:
                n = conn.recv_into(buf[: min(remaining, len(buf))])
                if n == 0:
                    return
                remaining -= n
                received += n
            if method == "GET" and target.startswith("/bytes/"):
                size = int(target.removeprefix("/bytes/"))
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode("ascii"))
                while size > 0:
                    size -= conn.send(CHUNK[: min(size, len(CHUNK))])
            elif method == "GET":
                _respond(conn, "200 OK", b"ok")
            else:
                _respond(conn, "200 OK", f"{received}\n".encode("ascii"))


def _serve_quietly(conn: socket.socket) -> None:
    # A client that resets or sends garbage ends its connection, not the sink.
    try:
        _serve(conn)
    except (OSError, ValueError):
        conn.close()


def main(port: int) -> None:
    with socket.create_server(("127.0.0.1", port), backlog=128) as srv:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_serve_quietly, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]))
