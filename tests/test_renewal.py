"""The renewal and retry policy (proxy/certs/renewal.py), on fixed clocks and dice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.renewal import (
    BACKOFF_MAX,
    AriWindow,
    Retry,
    ari_cert_id,
    next_retry,
    renewal_due,
)

T0 = datetime(2027, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def _never() -> float:
    return 0.0


def _always() -> float:
    return 1.0


@pytest.mark.parametrize(
    ("lifetime", "renew_after"),
    [
        (timedelta(days=90), timedelta(days=60)),
        (timedelta(days=64), timedelta(days=64) * 2 / 3),
        (timedelta(days=45), timedelta(days=30)),
        (timedelta(days=6), timedelta(days=3)),  # short-lived: at half the lifetime
        (timedelta(minutes=5), timedelta(minutes=2.5)),  # Pebble's short certificates
    ],
)
def test_without_ari_renew_at_a_third_or_half_of_the_lifetime_left(
    lifetime: timedelta, renew_after: timedelta
) -> None:
    due = renewal_due(T0, T0 + lifetime, now=T0, rand=_never)
    assert due == T0 + renew_after
    jittered = renewal_due(T0, T0 + lifetime, now=T0, rand=_always)
    assert jittered == due - min(timedelta(hours=1), lifetime / 100)


def test_overdue_and_expired_certificates_are_due_now() -> None:
    now = T0 + timedelta(days=70)
    assert renewal_due(T0, T0 + timedelta(days=90), now=now) == now
    now = T0 + timedelta(days=100)
    assert renewal_due(T0, T0 + timedelta(days=90), now=now) == now


def test_ari_window_picks_a_random_time_inside_it() -> None:
    window = AriWindow(T0 + timedelta(days=40), T0 + timedelta(days=42))
    expiry = T0 + timedelta(days=90)
    assert renewal_due(T0, expiry, now=T0, ari_window=window, rand=_never) == window.start
    assert renewal_due(T0, expiry, now=T0, ari_window=window, rand=_always) == window.end
    halfway = renewal_due(T0, expiry, now=T0, ari_window=window, rand=lambda: 0.5)
    assert halfway == T0 + timedelta(days=41)


def test_ari_window_already_open_picks_between_now_and_its_end() -> None:
    window = AriWindow(T0 + timedelta(days=40), T0 + timedelta(days=42))
    now = T0 + timedelta(days=41)
    due = renewal_due(T0, T0 + timedelta(days=90), now=now, ari_window=window, rand=_never)
    assert due == now
    due = renewal_due(T0, T0 + timedelta(days=90), now=now, ari_window=window, rand=_always)
    assert due == window.end


def test_ari_window_in_the_past_means_now() -> None:
    """RFC 9773: e.g. after a revocation the CA moves the window before the present."""
    window = AriWindow(T0 - timedelta(days=2), T0 - DAY)
    now = T0 + DAY
    assert renewal_due(T0, T0 + timedelta(days=90), now=now, ari_window=window) == now


def test_a_twentieth_of_the_lifetime_left_is_the_latest_even_with_ari() -> None:
    window = AriWindow(T0 + timedelta(days=96), T0 + timedelta(days=97))
    due = renewal_due(T0, T0 + timedelta(days=100), now=T0, ari_window=window, rand=_never)
    assert due == T0 + timedelta(days=95)


def test_after_failures_retry_then_switch_challenge_then_back_off() -> None:
    retries = [next_retry(n, T0, T0) for n in range(1, 8)]
    assert retries[:2] == [Retry(T0), Retry(T0, other_challenge=True)]
    delays = [r.at - T0 for r in retries[2:] if r is not None]
    assert delays == [timedelta(minutes=m) for m in (1, 2, 4, 8, 16)]


def test_the_fallback_ca_comes_before_the_backoff() -> None:
    retries = [next_retry(n, T0, T0, has_fallback_ca=True) for n in range(1, 5)]
    assert retries == [
        Retry(T0),
        Retry(T0, other_challenge=True),
        Retry(T0, fallback_ca=True),
        Retry(T0 + timedelta(minutes=1)),
    ]


def test_backoff_is_capped_at_a_day_and_stops_after_30_days() -> None:
    assert next_retry(13, T0, T0) == Retry(T0 + timedelta(minutes=1024))
    assert next_retry(14, T0, T0) == Retry(T0 + BACKOFF_MAX)
    assert next_retry(10_000, T0, T0) == Retry(T0 + BACKOFF_MAX)
    assert next_retry(40, T0, T0 + timedelta(days=29)) is not None
    assert next_retry(41, T0, T0 + timedelta(days=30)) is None


def test_backoff_is_sized_to_the_lifetime_of_the_certificate_renewed() -> None:
    six_days = timedelta(days=6)
    assert next_retry(3, T0, T0, lifetime=six_days) == Retry(T0 + timedelta(minutes=1))
    assert next_retry(50, T0, T0, lifetime=six_days) == Retry(T0 + six_days / 10)
    thirty_seconds = timedelta(seconds=30)
    delays = [next_retry(n, T0, T0, lifetime=thirty_seconds) for n in range(3, 7)]
    assert [r.at - T0 for r in delays if r is not None] == [
        timedelta(seconds=s) for s in (1, 2, 3, 3)
    ]
    assert next_retry(50, T0, T0, lifetime=timedelta(days=90)) == Retry(T0 + BACKOFF_MAX)


def test_retry_after_postpones_but_never_hastens() -> None:
    hour = timedelta(hours=1)
    assert next_retry(2, T0, T0, retry_after=hour) == Retry(T0 + hour, other_challenge=True)
    assert next_retry(14, T0, T0, retry_after=hour) == Retry(T0 + BACKOFF_MAX)


def test_next_retry_needs_a_failure() -> None:
    with pytest.raises(ValueError):
        next_retry(0, T0, T0)


def test_ari_cert_id_matches_the_rfc_9773_example() -> None:
    """RFC 9773 section 4.1: keyIdentifier 69:88:5B:..., serial 00:87:65:43:21."""
    key = ec.generate_private_key(ec.SECP256R1())
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(0x87654321)
        .not_valid_before(T0)
        .not_valid_after(T0 + DAY)
        .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.example")]), critical=True)
        .sign(key, hashes.SHA256())
    )
    assert ari_cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
