"""Whether a backend may receive requests: the passive and active health state machine.

Pure logic with the time passed in, so it is unit-tested without sleeping. Passive: failures
(refused, timed out, 5xx) within a window take a backend out for a cool-down. Active: a
periodic check's consecutive results move it between up and down (`fall`, `rise`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from proxy.config import HealthConfig


class BackendHealth:
    """One backend of one group. `on_change(up)` runs whenever availability flips."""

    def __init__(self, settings: HealthConfig, on_change: Callable[[bool, str], None]) -> None:
        self._settings = settings
        self._on_change = on_change
        self._failures: deque[float] = deque()
        self._down_until = 0.0  # passive: out until then
        self._checked_up = True  # active: the latest verdict (optimistic at start)
        self._streak = 0  # consecutive active results contrary to the verdict
        self._up = True

    def available(self, now: float) -> bool:
        if self._up or now < self._down_until or not self._checked_up:
            return self._up
        self._update(now, "cool-down over")  # the passive cool-down just ended
        return self._up

    def retry_after(self, now: float) -> float:
        """Seconds until this backend may be available again (a guess for Retry-After)."""
        if not self._checked_up:
            return self._settings.interval * self._settings.rise
        return max(self._down_until - now, 1.0)

    def failed(self, now: float) -> None:
        """A request's failure: refused, timed out, or a 5xx answer."""
        settings = self._settings
        failures = self._failures
        failures.append(now)
        while failures and failures[0] <= now - settings.fail_window:
            failures.popleft()
        if len(failures) >= settings.max_fails:
            failures.clear()
            self._down_until = now + settings.cooldown
            self._update(now, f"{settings.max_fails} failures within {settings.fail_window:g}s")

    def checked(self, passed: bool, now: float, detail: str) -> None:
        """The result of one active check."""
        if passed == self._checked_up:
            self._streak = 0
            return
        self._streak += 1
        needed = self._settings.rise if passed else self._settings.fall
        if self._streak >= needed:
            self._checked_up = passed
            self._streak = 0
            if passed:
                self._down_until = 0.0  # an active pass also ends a passive cool-down
            self._update(now, detail)

    def _update(self, now: float, reason: str) -> None:
        up = self._checked_up and now >= self._down_until
        if up != self._up:
            self._up = up
            self._on_change(up, reason)
