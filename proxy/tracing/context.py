"""W3C Trace Context (traceparent, tracestate): reading a trusted client's, starting a new
one, and the fields the upstream gets. Plain Python, no OpenTelemetry import: it runs on the
request path of a traced proxy, and `http/model.py` names its type."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from proxy.http.model import Headers

TRACE_FIELDS = frozenset((b"traceparent", b"tracestate"))
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_SAMPLED = 0x01
_MAX_TRACESTATE = 512  # the spec's minimum to keep; longer ones are dropped, not cut
_RANDOM_BITS = 2**64  # sampling decides by the trace id's lower 64 bits, as the SDK's ratio


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceContext:
    """One request's place in a trace: port443's server span and the remote parent it
    continues, if any. The upstream sees `span_id` as its parent."""

    trace_id: int
    span_id: int
    parent_span_id: int | None = None  # the trusted client's span; None: a new trace
    sampled: bool
    tracestate: bytes | None = None  # passed on from a trusted client, as received

    def upstream_fields(self) -> Headers:
        """traceparent (and tracestate) for the request to the upstream."""
        flags = _SAMPLED if self.sampled else 0
        parent = b"00-%032x-%016x-%02x" % (self.trace_id, self.span_id, flags)
        fields = [(b"traceparent", parent)]
        if self.tracestate:
            fields.append((b"tracestate", self.tracestate))
        return fields


@dataclass(frozen=True, slots=True)
class RemoteParent:
    trace_id: int
    span_id: int
    sampled: bool
    tracestate: bytes | None


def parse_parent(headers: Headers) -> RemoteParent | None:
    """The trace context a client sent (W3C Trace Context level 1, §3.2, §4.3), or None
    when absent or invalid; an invalid tracestate alone is dropped."""
    parents = [value for name, value in headers if name == b"traceparent"]
    if len(parents) != 1:
        return None
    match = _TRACEPARENT.fullmatch(parents[0].strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    states = [value.strip() for name, value in headers if name == b"tracestate"]
    state = b",".join(value for value in states if value) or None
    if state is not None and (len(state) > _MAX_TRACESTATE or not state.isascii()):
        state = None
    sampled = bool(int(flags_hex, 16) & _SAMPLED)
    return RemoteParent(trace_id, span_id, sampled, state)


def new_span_id() -> int:
    """A random non-zero 64-bit span id (as the SDK's RandomIdGenerator)."""
    while not (span_id := random.getrandbits(64)):
        pass
    return span_id


def begin_trace(parent: RemoteParent | None, sample_ratio: float) -> TraceContext:
    """The context of a new server span: a child of `parent`, following its sampling
    decision, or the root of a new trace sampled by `sample_ratio` of its trace id."""
    if parent is not None:
        return TraceContext(
            trace_id=parent.trace_id,
            span_id=new_span_id(),
            parent_span_id=parent.span_id,
            sampled=parent.sampled,
            tracestate=parent.tracestate,
        )
    while not (trace_id := random.getrandbits(128)):
        pass
    sampled = (trace_id % _RANDOM_BITS) < round(sample_ratio * _RANDOM_BITS)
    return TraceContext(trace_id=trace_id, span_id=new_span_id(), sampled=sampled)
