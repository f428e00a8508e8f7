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

from proxy.config import Http2Config

FRAME_HEADER_BYTES = 9


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
    """The caps of one connection. The reader reports what each read produced."""

    __slots__ = ("_max_quiet_bytes", "_quiet_bytes", "control", "resets")

    def __init__(self, config: Http2Config) -> None:
        self.resets = RateCap(config.max_resets_per_second, "stream resets")
        self.control = RateCap(config.max_control_frames_per_second, "control frames")
        # Every complete frame yields an h2 event, except those of a header block in
        # progress; a partial frame is at most one frame long. So input that yields no
        # event beyond one frame plus a maximal header list is an oversized header block,
        # caught long before h2's own cap (64 CONTINUATION frames) would buffer 1 MiB.
        self._max_quiet_bytes = (
            config.max_header_list_size + config.max_frame_size + FRAME_HEADER_BYTES
        )
        self._quiet_bytes = 0

    def received(self, size: int, produced_events: bool) -> None:
        """Account one read of `size` bytes; raises EnhanceYourCalm for an endless header block."""
        if produced_events:
            self._quiet_bytes = 0
            return
        self._quiet_bytes += size
        if self._quiet_bytes > self._max_quiet_bytes:
            raise EnhanceYourCalm(f"header block larger than {self._max_quiet_bytes} bytes")
