"""When to renew a certificate, and when to try again after a failure: pure functions.

The policy is certmagic's, so that nothing assumes 90-day certificates:
- the CA's ARI window (RFC 9773 renewalInfo) when it offers one: a uniformly random time
  inside what is left of the window, so that a fleet does not renew in lockstep;
- otherwise when a third of the lifetime is left (half, for lifetimes under 10 days),
  a little early by a random jitter;
- in any case no later than when a twentieth of the lifetime is left.

After a failure: retry at once, then with the other challenge type first, then at the
fallback CA, then with exponential backoff from 1 minute up to 1 day; after 30 days of
failures stop. The backoff is sized to the lifetime of the certificate being renewed: at
most a tenth of it between tries (a 6-day certificate, renewed with 3 days left, is tried at
least every 14.4 h), starting from a hundredth (at least 1 s). A CA's Retry-After always
postpones the next try.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

SHORT_LIFETIME = timedelta(days=10)  # below this, renew at half the lifetime
MAX_JITTER = timedelta(hours=1)  # and at most 1% of the lifetime
BACKOFF_MIN = timedelta(minutes=1)
BACKOFF_MAX = timedelta(days=1)
BACKOFF_FLOOR = timedelta(seconds=1)  # the shortest first backoff, however short the lifetime
GIVE_UP_AFTER = timedelta(days=30)


@dataclass(frozen=True)
class AriWindow:
    """RFC 9773 suggestedWindow: the CA wants the certificate renewed in [start, end]."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class Retry:
    """The next try after a failure."""

    at: datetime
    other_challenge: bool = False  # put another enabled challenge type first
    fallback_ca: bool = False  # order from the fallback directory


def renewal_due(
    not_before: datetime,
    not_after: datetime,
    now: datetime,
    ari_window: AriWindow | None = None,
    *,
    rand: Callable[[], float] = random.random,
) -> datetime:
    """When to renew a certificate valid from `not_before` to `not_after`; `now` if overdue."""
    lifetime = not_after - not_before
    latest = not_after - lifetime / 20
    if ari_window is not None:
        start = max(ari_window.start, now)
        due = start + (ari_window.end - start) * rand() if ari_window.end > now else now
    else:
        left = lifetime / 2 if lifetime < SHORT_LIFETIME else lifetime / 3
        due = not_after - left - min(MAX_JITTER, lifetime / 100) * rand()
    return max(min(due, latest), now)


def next_retry(
    failures: int,
    first_failure: datetime,
    now: datetime,
    *,
    has_fallback_ca: bool = False,
    retry_after: timedelta | None = None,
    lifetime: timedelta | None = None,
) -> Retry | None:
    """The try after `failures` consecutive failures (the first at `first_failure`); None: stop.

    `lifetime`: that of the certificate being renewed, which scales the backoff down.
    """
    if failures < 1:
        raise ValueError("next_retry is for after a failure")
    if now - first_failure >= GIVE_UP_AFTER:
        return None
    quick = [Retry(now), Retry(now, other_challenge=True)]
    if has_fallback_ca:
        quick.append(Retry(now, fallback_ca=True))
    if failures <= len(quick):
        retry = quick[failures - 1]
    else:
        low, high = backoff_bounds(lifetime)
        exponent = min(failures - len(quick) - 1, 20)  # 2**20 times the start is past the cap
        retry = Retry(now + min(low * 2**exponent, high))
    if retry_after is not None and retry.at < now + retry_after:
        retry = Retry(now + retry_after, retry.other_challenge, retry.fallback_ca)
    return retry


def backoff_bounds(lifetime: timedelta | None) -> tuple[timedelta, timedelta]:
    """The first and the longest backoff for a certificate of `lifetime` (None: unknown)."""
    if lifetime is None:
        return BACKOFF_MIN, BACKOFF_MAX
    return max(min(BACKOFF_MIN, lifetime / 100), BACKOFF_FLOOR), min(BACKOFF_MAX, lifetime / 10)


def ari_cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 CertID naming `cert` in renewalInfo URLs and in a new order's `replaces`.

    base64url(authorityKeyIdentifier) "." base64url(serial as DER INTEGER content bytes).
    """
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("the certificate's authorityKeyIdentifier has no keyIdentifier")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # room for sign bit
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_bytes)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
