"""HTTP/1.1 messages written as bytes, for heads whose fields were already validated.

Every field was checked where it came in (the HTTP/1.1 parser, the HTTP/2 and HTTP/3
field checks) or is our own, so writing only keeps the framing rules (RFC 9112 §6): which
responses have no body, Content-Length held to exactly, chunked when the length is unknown
and the peer speaks HTTP/1.1, else close-delimited. Sans-IO: each call returns the bytes to
send. Requests to upstreams and responses to clients share the body framing.
"""

from __future__ import annotations

from http import HTTPStatus

from proxy.http.model import CONNECTION_CLOSE, Headers

REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


class FramingError(Exception):
    """The body did not match the response's Content-Length: the connection must end,
    so that a short or overlong body cannot pass for a complete one."""


def _head(start_line: bytes, fields: Headers) -> bytes:
    lines = [start_line + b"\r\n"]
    lines += [name + b": " + value + b"\r\n" for name, value in fields]
    lines.append(b"\r\n")
    return b"".join(lines)


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b""))


def informational(status: int, fields: Headers) -> bytes:
    """A 1xx response (100 Continue, 101 Switching Protocols, 103 Early Hints)."""
    return _head(_status_line(status), fields)


class _BodyFraming:
    """The body framing of one message: counted, chunked, close-delimited or none."""

    __slots__ = ("_bodiless", "_chunked", "_remaining", "complete")

    def __init__(self) -> None:
        self._bodiless = False  # whatever body comes is dropped (HEAD, 1xx, 204, 304)
        self._chunked = False
        self._remaining: int | None = None  # body bytes still owed; None: not counted
        self.complete = False

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


class ResponseWriter(_BodyFraming):
    """The framing of one final response to a request."""

    __slots__ = ("keep_alive",)

    def __init__(self) -> None:
        super().__init__()
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
        return _head(_status_line(status), fields)


class RequestWriter(_BodyFraming):
    """The framing of one request to an upstream: `fields` already carry its framing
    (Content-Length, or Transfer-Encoding: chunked), as `body_length` and `has_body` say."""

    __slots__ = ()

    def head(
        self,
        method: bytes,
        target: bytes,
        fields: Headers,
        *,
        body_length: int | None,
        has_body: bool,
    ) -> bytes:
        if body_length is not None:
            self._remaining = body_length
        elif has_body:
            self._chunked = True
        else:
            self._bodiless = True
        return _head(method + b" " + target + b" HTTP/1.1", fields)
