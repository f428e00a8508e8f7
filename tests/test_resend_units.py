"""The resend policy and the replay buffer (proxy/handlers/resend.py), in process: which
failure allows which next attempt, and what a second attempt sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Upstream, UpstreamGroup
from proxy.config_load import ConfigError, parse_config
from proxy.handlers.resend import ReplayBuffer, Resend, after_failure
from proxy.http.model import ConnectionInfo, Headers, Outcome, Request
from proxy.upstream.stream import UpstreamClosed, UpstreamProtocolError, UpstreamRefused

GROUP = UpstreamGroup(name="g", upstreams=(Upstream("http://b:1", "http", "b", 1),))
LENIENT = UpstreamGroup(name="g", upstreams=GROUP.upstreams, retry_non_idempotent=True)


class FakeExchange:
    """A client sending `chunks` as its body, then `trailers`."""

    def __init__(self, chunks: list[bytes], method: bytes = b"PUT") -> None:
        self.request = Request(
            method=method,
            target=b"/",
            host=b"h",
            headers=[],
            http_version=b"1.1",
            has_body=bool(chunks),
            client_ip="127.0.0.1",
        )
        self._chunks = list(chunks)
        self.request_trailers: Headers | None = [(b"x-t", b"1")]

    async def receive_data(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


class Recorder:
    """An upstream recording what it was sent; `fail_after` chunks, it breaks."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[bytes] = []
        self.trailers: Headers | None = None
        self._fail_after = fail_after

    async def send_data(self, data: bytes, timeout: float) -> None:
        if self._fail_after is not None and len(self.sent) == self._fail_after:
            raise UpstreamClosed("gone")
        self.sent.append(data)

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        self.trailers = trailers


def outcome_of(exchange: FakeExchange) -> Outcome:
    return Outcome(
        request=exchange.request,
        info=ConnectionInfo(client_ip="127.0.0.1", tls_version=None, alpn=None),
        listener="https",
        client_ip="127.0.0.1",
        started=0.0,
        finished=0.0,
    )


def replay_of(chunks: list[bytes], limit: int = 10, method: bytes = b"PUT") -> ReplayBuffer:
    exchange = FakeExchange(chunks, method)
    return ReplayBuffer(exchange, outcome_of(exchange), limit)


async def test_a_second_attempt_sends_what_the_first_read_then_the_rest() -> None:
    exchange = FakeExchange([b"abc", b"def", b"gh"])
    outcome = outcome_of(exchange)
    replay = ReplayBuffer(exchange, outcome, 10)
    first = Recorder(fail_after=1)
    with pytest.raises(UpstreamClosed):
        await replay.send(first, 1.0)
    assert first.sent == [b"abc"] and replay.replayable  # "def" was read, not sent
    second = Recorder()
    await replay.send(second, 1.0)
    assert second.sent == [b"abc", b"def", b"gh"] and second.trailers == [(b"x-t", b"1")]
    assert replay.ended and outcome.bytes_in == 8  # counted once, not per attempt


async def test_a_body_past_the_limit_is_not_kept() -> None:
    replay = replay_of([b"123456", b"78901"], limit=10)
    await replay.send(Recorder(), 1.0)
    assert not replay.replayable


async def test_an_answer_drops_the_kept_bytes() -> None:
    replay = replay_of([b"abc"])
    await replay.send(Recorder(), 1.0)
    assert replay.replayable
    replay.answer_started()
    assert not replay.replayable and replay.answered


def verdict(
    error: UpstreamClosed,
    method: bytes = b"GET",
    *,
    replay: ReplayBuffer | None = None,
    group: UpstreamGroup = GROUP,
    refusals: int = 0,
    stale: bool = False,
) -> Resend:
    return after_failure(
        error,
        method=method,
        replay=replay or replay_of([], method=method),
        group=group,
        refusals=refusals,
        stale=stale,
    )


def test_idempotent_requests_go_elsewhere_non_idempotent_ones_only_if_allowed() -> None:
    closed = UpstreamClosed("reset")
    assert verdict(closed, b"GET") is verdict(closed, b"PUT") is Resend.ELSEWHERE
    assert verdict(closed, b"POST") is verdict(closed, b"PATCH") is Resend.NO
    assert verdict(closed, b"POST", group=LENIENT) is Resend.ELSEWHERE


def test_refused_requests_go_again_whatever_the_method_a_few_times() -> None:
    refused = UpstreamRefused("GOAWAY")
    assert verdict(refused, b"POST") is Resend.AGAIN
    assert verdict(refused, b"POST", refusals=2) is Resend.NO


def test_a_stale_pooled_connection_is_resent_once_when_safe() -> None:
    closed = UpstreamClosed("closed without responding")
    assert verdict(closed, b"GET", stale=True) is Resend.AGAIN
    assert verdict(closed, b"POST", stale=True) is Resend.NO


async def test_never_after_an_answer_a_protocol_error_or_an_unkept_body() -> None:
    answered = replay_of([])
    answered.answer_started()
    assert verdict(UpstreamClosed("cut"), replay=answered) is Resend.NO
    assert verdict(UpstreamRefused("GOAWAY"), replay=answered) is Resend.NO
    assert verdict(UpstreamProtocolError("junk")) is Resend.NO
    big = replay_of([b"x" * 11], limit=10)
    await big.send(Recorder(), 1.0)
    assert verdict(UpstreamClosed("reset"), b"PUT", replay=big) is Resend.NO
    assert verdict(UpstreamRefused("GOAWAY"), b"PUT", replay=big) is Resend.NO


def test_the_group_keys_are_read_and_bounded(tmp_path: Path) -> None:
    site = '[[sites]]\nhosts = ["a.test"]\nupstreams = { backends = ["http://b:1"], %s }\n'
    group = (
        parse_config(site % "retry_buffer = 0, retry_non_idempotent = true", tmp_path / "c.toml")
        .sites[0]
        .own_group
    )
    assert (group.retry_buffer, group.retry_non_idempotent) == (0, True)
    assert GROUP.retry_buffer == 65536 and not GROUP.retry_non_idempotent
    with pytest.raises(ConfigError) as error:
        parse_config(site % "retry_buffer = 16777217", tmp_path / "c.toml")
    assert "retry_buffer: must be an integer from 0 to 16777216" in str(error.value)
