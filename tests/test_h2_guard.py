"""The HTTP/2 flood caps on their own: frame boundaries followed across arbitrary reads."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from proxy.config import Http2Config
from proxy.http.h2_guard import EnhanceYourCalm, FloodGuard, RateCap

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMIT = 20000


def _feed(data: bytes, step: int) -> None:
    guard = FloodGuard(Http2Config(max_header_list_size=LIMIT))
    for start in range(0, len(data), step):
        guard.received(data[start : start + step], lambda: 0.0)


def _block(*sizes: int, ended: bool) -> bytes:
    """HEADERS then CONTINUATION frames of `sizes` bytes; END_HEADERS on the last if `ended`."""
    frames = [HeadersFrame(1, data=bytes(sizes[0]))]
    frames += [ContinuationFrame(1, data=bytes(size)) for size in sizes[1:]]
    if ended:
        frames[-1].flags.add("END_HEADERS")
    return b"".join(frame.serialize() for frame in frames)


@pytest.mark.parametrize("step", [1, 7, 9, 1000, 1 << 20])
def test_ordinary_traffic_and_big_bodies_pass(step: int) -> None:
    """A block just under the limit and 160 KiB of DATA pass; the guard still follows the
    frame boundaries after them, so a block over the limit that comes next is refused."""
    data = PREFACE + SettingsFrame(0).serialize() + _block(8000, 8000, 3000, ended=True)
    data += b"".join(DataFrame(1, data=bytes(16384)).serialize() for _ in range(10))
    oversized = _block(16000, 16000, ended=False)
    with pytest.raises(EnhanceYourCalm) as refused:
        _feed(data + oversized, step)
    assert refused.value.args == (f"header block beyond {LIMIT} bytes",)
    _feed(data, step)  # and without it, nothing is refused


@pytest.mark.parametrize("step", [1, 7, 9, 1000, 1 << 20])
def test_a_header_block_beyond_the_limit_is_refused(step: int) -> None:
    data = PREFACE + _block(16000, 16000, 16000, ended=False)
    with pytest.raises(EnhanceYourCalm, match="header block beyond 20000 bytes"):
        _feed(data, step)


def test_rate_cap_counts_per_second() -> None:
    cap = RateCap(2, "pings")
    cap.hit(10.0)
    cap.hit(10.5)
    with pytest.raises(EnhanceYourCalm, match="more than 2 pings per second"):
        cap.hit(10.9)
    cap.hit(11.1)  # a new window


@pytest.mark.parametrize("step", [1, 9, 1 << 20])
def test_the_clients_resets_are_counted_before_h2_parses_the_read(step: int) -> None:
    """Rapid reset: the 201st RST_STREAM within a second is refused as it is seen, so h2
    never decodes the header blocks of the read that brought it."""
    pairs = [
        HeadersFrame(n, data=bytes(30), flags=["END_HEADERS", "END_STREAM"]).serialize()
        + RstStreamFrame(n, error_code=8).serialize()
        for n in range(1, 403, 2)
    ]
    guard = FloodGuard(Http2Config(max_resets_per_second=200))
    data = PREFACE + b"".join(pairs[:200])
    for start in range(0, len(data), step):
        guard.received(data[start : start + step], lambda: 5.0)
    with pytest.raises(EnhanceYourCalm, match="more than 200 stream resets per second"):
        guard.received(pairs[200], lambda: 5.5)
    guard = FloodGuard(Http2Config(max_resets_per_second=200))
    guard.received(data, lambda: 5.0)
    guard.received(pairs[200], lambda: 6.0)  # the next second: a new count
