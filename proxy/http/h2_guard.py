"""Caps on what one HTTP/2 client can make the proxy do cheaply, per connection.

Each attack below costs the client a few bytes and the server real work or memory:
  * rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, over and over; each stream may
    reach the upstream before it is cancelled. Resets we send for malformed requests count
    too ("MadeYouReset", CVE-2025-8671: the client provokes the reset instead of sending it).
  * SETTINGS/PING/PRIORITY and empty DATA floods (CVE-2019-9512/9513/9515/9518): each costs
    a reply or some bookkeeping, and replies queue up if the client does not read.
  * CONTINUATION flood (2024): a header block that never ends is buffered until it does.
An offender gets GOAWAY(ENHANCE_YOUR_CALM) and is closed; other connections are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import Http2Config

PREFACE_BYTES = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
HEADERS = 0x1
RST_STREAM = 0x3
CONTINUATION = 0x9
END_HEADERS = 0x4


class EnhanceYourCalm(Exception):
    """The client exceeded a cap: close the connection with ENHANCE_YOUR_CALM."""


class RateCap:
    """At most `limit` hits per one-second window."""

    __slots__ = ("_count", "_limit", "_window_end", "what")

    def __init__(self, limit: int, what: str) -> None:
        self._limit = limit
        self._count = 0
        self._window_end = 0.0
        self.what = what

    def hit(self, now: float) -> None:
        if now >= self._window_end:
            self._window_end = now + 1.0
            self._count = 0
        self._count += 1
        if self._count > self._limit:
            raise EnhanceYourCalm(f"more than {self._limit} {self.what} per second")


class FloodGuard:
    """The caps of one connection: the reader shows it every read before h2 parses it (header
    blocks, the client's resets), and counts resets we send and control frames as h2 reports
    them."""

    __slots__ = ("_block", "_block_limit", "_head", "_skip", "control", "resets")

    def __init__(self, config: Http2Config) -> None:
        self.resets = RateCap(config.max_resets_per_second, "stream resets")
        self.control = RateCap(config.max_control_frames_per_second, "control frames")
        # An encoded header block is no larger than the header list it decodes to, so a
        # block past max_header_list_size is refused before h2 buffers it (h2 alone would
        # take 64 CONTINUATION frames: 1 MiB).
        self._block_limit = config.max_header_list_size
        self._block = -1  # bytes of the header block in progress; -1 when none is
        self._skip = PREFACE_BYTES  # bytes before the next frame header
        self._head = b""  # a frame header split across reads

    def received(self, data: bytes, clock: Callable[[], float]) -> None:
        """Follow the frame headers in `data` (payloads are skipped, h2 parses them);
        raises EnhanceYourCalm for an oversized header block, or past the client's resets
        per second. Counted here, a rapid reset ends before h2 decodes the header blocks of
        the read that crossed the line (one read may hold 2,000 of them: 100 ms of work). The
        clock is read only for a reset, not for every read."""
        if self._head:
            data = self._head + data
            self._head = b""
        size = len(data)
        pos = self._skip
        while pos + FRAME_HEADER_BYTES <= size:
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            kind = data[pos + 3]
            if kind == HEADERS or (kind == CONTINUATION and self._block >= 0):
                self._block = max(self._block, 0) + length
                if data[pos + 4] & END_HEADERS:
                    self._block = -1
                elif self._block > self._block_limit:
                    raise EnhanceYourCalm(f"header block beyond {self._block_limit} bytes")
            elif kind == RST_STREAM:
                self.resets.hit(clock())
            pos += FRAME_HEADER_BYTES + length
        if pos < size:
            self._head = data[pos:]
            self._skip = 0
        else:
            self._skip = pos - size
