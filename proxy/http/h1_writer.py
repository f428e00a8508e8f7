"""HTTP/1.1 responses written as bytes, for heads whose fields were already validated.

h11 parses every request (that is where validation protects us); writing the response
through it again would normalise and re-check fields that came from a parser or from
us, and step its state machine for each piece of body. This writer keeps only the framing
rules (RFC 9112 §6): which responses have no body, Content-Length held to exactly, chunked
when the length is unknown and the client speaks HTTP/1.1, else close-delimited. Sans-IO:
each call returns the bytes to send.
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.http.model import CONNECTION_CLOSE, Headers

REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


class FramingError(Exception):
    """The body did not match the response's Content-Length: the connection must end,
    so that a short or overlong body cannot pass for a complete one."""


def _head(status: int, fields: Headers) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
    lines += [name + b": " + value + b"\r\n" for name, value in fields]
    lines.append(b"\r\n")
    return b"".join(lines)


def informational(status: int, fields: Headers) -> bytes:
    """A 1xx response (100 Continue, 101 Switching Protocols, 103 Early Hints)."""
    return _head(status, fields)


class ResponseWriter:
    """The framing of one final response to a request."""

    __slots__ = ("_bodiless", "_chunked", "_remaining", "complete", "keep_alive")

    def __init__(self) -> None:
        self._bodiless = False  # HEAD, 1xx, 204, 304: whatever body comes is dropped
        self._chunked = False
        self._remaining: int | None = None  # body bytes still owed; None: not counted
        self.complete = False
        self.keep_alive = False

    def head(
        self, status: int, fields: Headers, *, head_request: bool, http11: bool, keep_alive: bool
    ) -> bytes:
        """The head; `keep_alive` is what the request allows (and we want)."""
        length: bytes | None = None
        says_close = False
        for name, value in fields:
            if name == b"content-length":
                length = value
            elif name == b"connection" and b"close" in value.lower():
                says_close = True
        if head_request or status in (204, 304) or status < 200:
            self._bodiless = True
        elif length is not None:
            self._remaining = int(length)
        elif http11:
            self._chunked = True
            fields = [*fields, (b"transfer-encoding", b"chunked")]
        else:
            keep_alive = False  # HTTP/1.0 without a length: the close ends the body
        self.keep_alive = keep_alive and not says_close
        if not keep_alive and not says_close:
            fields = [*fields, CONNECTION_CLOSE]
        return _head(status, fields)

    def data(self, data: bytes) -> bytes:
        if self._bodiless:
            return b""
        remaining = self._remaining
        if remaining is not None:
            if len(data) > remaining:
                raise FramingError(f"{len(data) - remaining} body bytes past the Content-Length")
            self._remaining = remaining - len(data)
            return data
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        return data

    def end(self, trailers: Headers | None = None) -> bytes:
        self.complete = True
        if self._remaining:
            raise FramingError(f"the body ended {self._remaining} bytes short")
        if not self._chunked:
            return b""
        return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers or ()) + b"\r\n"
