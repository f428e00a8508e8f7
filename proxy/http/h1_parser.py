"""HTTP/1.1 message parsing for both sides of the proxy: llhttp (through httptools) in strict
mode, driven as a pull parser (`receive_data`, then `next_event` until `NEED_DATA`).

llhttp is Node's parser: C, and strict about what request smuggling feeds on (bare LF,
obs-fold, whitespace before a colon, CL with TE, duplicate or signed Content-Length, chunk
framing), at a tenth of a pure-Python parser's cost per request. It pushes callbacks over
whatever it is fed, so this wrapper feeds it one message at a time: a head up to its blank
line, a Content-Length body up to its length. So every head's raw bytes are known (the
front end's own checks read them) and bytes past a message stay unread, for the next
request or to refuse a pooled upstream connection that sent more than it should.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from proxy.http.model import Headers

_HEAD_END = b"\r\n\r\n"
_LINE_ENDS = (b"\r", b"\n")


class NeedData:
    """More input is needed before the next event."""


class Closed:
    """The peer closed the connection: between messages, or cutting one short."""


NEED_DATA = NeedData()
CLOSED = Closed()


class ParseError(Exception):
    """The message is malformed; `status` is the answer a client would get (400 or 431)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(slots=True)
class MessageHead:
    """A request or response head: names lower-case, values without surrounding whitespace."""

    method: bytes  # requests; b"" for responses
    target: bytes  # requests; b"" for responses
    status: int  # responses; 0 for requests
    http_version: bytes  # b"1.1", b"1.0"
    headers: Headers
    raw: bytes  # the head as received, up to and including its blank line


@dataclass(slots=True)
class MessageEnd:
    trailers: Headers | None


Event = MessageHead | bytes | MessageEnd | NeedData | Closed

# What a message's body is framed by, once its head is parsed.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _MoreThanOneMessage(Exception):
    """Raised from llhttp's message-begin callback: bytes past the end of a chunked body."""


class H1Parser:
    """One direction of an HTTP/1.1 connection: requests (`request=True`) or responses.

    llhttp holds its callbacks' object, so they live on `_Message`, which never refers back:
    a parser and its message are freed by reference counting when the caller drops them,
    not left as a reference cycle per message for the garbage collector (measured: about
    30 objects per request, and the collector's passes over them).
    """

    __slots__ = ("_eof", "_max_head", "_message", "_parser", "_pending", "overrun")

    def __init__(self, *, request: bool, max_head_bytes: int, pending: bytes = b"") -> None:
        self._max_head = max_head_bytes
        self._message = message = _Message(request)
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpRequestParser(message)
            if request
            else httptools.HttpResponseParser(message)
        )
        self._pending = pending  # received, not yet fed to llhttp
        self._eof = False
        self.overrun = False  # bytes followed a chunked body in the same read: not kept

    # -- input and events ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" for the end of the stream."""
        if data:
            self._pending += data
        else:
            self._eof = True

    @property
    def bodiless_response(self) -> bool:
        return self._message.bodiless_response

    @bodiless_response.setter
    def bodiless_response(self, value: bool) -> None:
        """Set by the caller for a response to HEAD."""
        self._message.bodiless_response = value

    @property
    def upgraded(self) -> bool:
        """The message switched protocols; `trailing_data` follows it."""
        return self._message.upgraded

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the message (after `MessageEnd` or an upgrade)."""
        return self._pending

    @property
    def closed(self) -> bool:
        """The peer closed its side (what is pending is all there will be)."""
        return self._eof

    @property
    def complete(self) -> bool:
        message = self._message
        return message.ended and not message.events

    def next_event(self) -> Event:
        """The next event; raises ParseError for a malformed message."""
        message = self._message
        events = message.events
        while not events:
            if message.ended:
                return NEED_DATA
            if not message.head_done:
                if not self._feed_head():
                    return self._at_end_of_input()
            elif not self._feed_body():
                return self._at_end_of_input()
        return events.pop(0)

    def _at_end_of_input(self) -> Event:
        if not self._eof:
            return NEED_DATA
        message = self._message
        if message.framing == _UNTIL_CLOSE and message.head_done:
            message.end(None)
            return message.events.pop(0)
        return CLOSED  # before a message or in the middle of one: the caller knows which

    def _feed_head(self) -> bool:
        """Feed the pending bytes up to the head's blank line; False when none were there."""
        message = self._message
        pending = self._pending
        head = message.head
        if not head and pending[:1] in _LINE_ENDS:  # empty lines before a request line
            pending = pending.lstrip(b"\r\n")  # are ignored (RFC 9112 §2.2)
        if not pending:
            self._pending = pending
            return False
        if head:  # the blank line may straddle two reads
            tail = bytes(head[-3:])
            found = (tail + pending).find(_HEAD_END)
            end = -1 if found < 0 else found + len(_HEAD_END) - len(tail)
        else:
            found = pending.find(_HEAD_END)
            end = -1 if found < 0 else found + len(_HEAD_END)
        take = len(pending) if end < 0 else end
        chunk, self._pending = pending[:take], pending[take:]
        if isinstance(head, bytearray) and head:
            head += chunk
        else:  # a head that came in one read is kept as it came, no copy
            message.head = head = chunk if end >= 0 else bytearray(chunk)
        parser = self._parser
        message.llhttp = parser  # for the head's callback, while it is fed (no cycle)
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            # A 101, or a request asking to switch (llhttp skips its body): what follows
            # the head belongs to the new protocol.
            if message.framing != _NONE:
                raise ParseError("a protocol upgrade request with a body") from None
            message.upgraded = message.ended = True
        except httptools.HttpParserError as exc:
            raise ParseError(_reason(exc)) from None
        finally:
            message.llhttp = None
        if len(head) > self._max_head:
            raise ParseError(f"head larger than {self._max_head} bytes", 431)
        return True

    def _feed_body(self) -> bool:
        pending = self._pending
        if not pending:
            return False
        message = self._message
        if message.framing == _LENGTH:
            take = min(len(pending), message.body_left)
            chunk, self._pending = pending[:take], pending[take:]
            message.body_left -= take
        else:
            chunk, self._pending = pending, b""
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _MoreThanOneMessage):
                raise ParseError(_reason(exc)) from None
            self.overrun = True
        except httptools.HttpParserError as exc:
            raise ParseError(_reason(exc)) from None
        return True


class _Message:
    """llhttp's callbacks, and the message they have parsed so far."""

    __slots__ = (
        "bodiless_response",
        "body_left",
        "ended",
        "events",
        "framing",
        "head",
        "head_done",
        "headers",
        "is_request",
        "llhttp",
        "status",
        "trailers",
        "upgraded",
        "url",
    )

    def __init__(self, request: bool) -> None:
        self.is_request = request
        self.llhttp: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.events: list[Event] = []
        self.head: bytes | bytearray = b""  # the head so far, as fed
        self.head_done = False
        self.url: list[bytes] = []
        self.status = b""
        self.headers: Headers = []
        self.trailers: Headers = []
        self.framing = _NONE
        self.body_left = 0
        self.ended = False  # the message is complete; later input is the next one's
        self.bodiless_response = False
        self.upgraded = False

    def on_message_begin(self) -> None:
        if self.ended:
            raise _MoreThanOneMessage

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        field = (name.lower(), value.rstrip(b" \t"))
        (self.trailers if self.head_done else self.headers).append(field)

    def on_headers_complete(self) -> None:
        parser = self.llhttp
        assert parser is not None
        version = parser.get_http_version().encode("ascii")
        headers = self.headers
        if self.is_request:
            assert isinstance(parser, httptools.HttpRequestParser)
            method, target, status = parser.get_method(), b"".join(self.url), 0
        else:
            assert isinstance(parser, httptools.HttpResponseParser)
            method, target, status = b"", b"", parser.get_status_code()
        head = MessageHead(method, target, status, version, headers, bytes(self.head))
        self.events.append(head)
        if 100 <= status < 200:  # interim: the final response's head follows
            self.head, self.headers, self.status = b"", [], b""
            return
        self.head_done = True
        self.framing = self._body_framing(status, headers)
        if self.framing == _NONE:
            self.end(None)

    def _body_framing(self, status: int, headers: Headers) -> int:
        if self.bodiless_response or status in (204, 304):
            return _NONE
        length: bytes | None = None
        for name, value in headers:
            if name == b"transfer-encoding":
                return _CHUNKED  # llhttp refused anything but a final chunked, or CL with TE
            if name == b"content-length":
                length = value
        if length is not None:
            self.body_left = int(length)
            return _LENGTH if self.body_left else _NONE
        return _NONE if self.is_request else _UNTIL_CLOSE

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self.head_done and not self.ended:  # not an interim response; a bodiless
            # message ended with its head already
            self.end(self.trailers or None)

    def end(self, trailers: Headers | None) -> None:
        self.ended = True
        self.events.append(MessageEnd(trailers))


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
