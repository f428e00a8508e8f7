"""Log lines for events an attacker can repeat at will: at most one line per interval."""

from __future__ import annotations

import logging
import math
import time


class RateLimitedLog:
    """One log line per `interval` seconds for a recurring event, saying how many times it
    happened since the last line, so a flood cannot fill the disk or drown other lines."""

    __slots__ = ("_interval", "_last", "_level", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, level: int, interval: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" (and {self._suppressed} more since the last such line)"
        self._last, self._suppressed = now, 0
        self._logger.log(self._level, message, *args)
