"""Load-balancing policies: which of a group's available backends serves the next request.

Pure logic over backend indices, no I/O, so each policy is unit-tested on its own; the group
(`upstream/group.py`) says which backends are available and how busy each one is.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

from proxy.config import Policy
from proxy.http.model import Request

RING_POINTS = 160  # virtual nodes per unit of weight: an even spread, a ring of a few KiB


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Balancer:
    """One group's policy and its state (the round-robin position, the hash ring)."""

    def __init__(self, policy: Policy, names: Sequence[str], weights: Sequence[int]) -> None:
        self.policy = policy
        self._weights = list(weights) or [1] * len(names)
        self._current = [0] * len(names)  # smooth weighted round robin, as nginx
        self._random = random.Random()
        self._ring: list[tuple[int, int]] = []
        if policy == "consistent_hash":
            self._ring = sorted(
                (_point(f"{name}#{i}".encode()), index)
                for index, name in enumerate(names)
                for i in range(RING_POINTS * self._weights[index])
            )
            self._ring_points = [point for point, _ in self._ring]

    def pick(self, available: Sequence[int], busy: Sequence[int], key: bytes | None) -> int:
        """One of `available` (non-empty), given the requests in flight per backend and, for
        consistent_hash, the request's key."""
        if len(available) == 1:
            return available[0]
        if self.policy == "round_robin":
            return self._round_robin(available)
        if self.policy == "least_conn":
            fewest = min(busy[i] / self._weights[i] for i in available)
            return self._round_robin([i for i in available if busy[i] / self._weights[i] == fewest])
        if self.policy == "random_two":
            first, second = self._random.sample(list(available), 2)
            load = busy[first] / self._weights[first], busy[second] / self._weights[second]
            return first if load[0] <= load[1] else second
        return self._hashed(available, key or b"")

    def _round_robin(self, available: Sequence[int]) -> int:
        """Smooth weighted round robin: each backend gains its weight, the richest is chosen
        and pays the total; weights 5,1,1 give a,a,b,a,c,a,a rather than bursts."""
        current, weights = self._current, self._weights
        total = 0
        best = available[0]
        for index in available:
            current[index] += weights[index]
            total += weights[index]
            if current[index] > current[best]:
                best = index
        current[best] -= total
        return best

    def _hashed(self, available: Sequence[int], key: bytes) -> int:
        """The first available backend clockwise of the key on the ring: a backend going
        down moves only its own keys."""
        ring = self._ring
        start = bisect.bisect(self._ring_points, _point(key))
        usable = set(available)
        for offset in range(len(ring)):
            index = ring[(start + offset) % len(ring)][1]
            if index in usable:
                return index
        return available[0]


def request_key(hash_key: str, request: Request, client_ip: str) -> bytes:
    """What consistent hashing hashes: the client IP, a header's value or a cookie's."""
    kind, _, name = hash_key.partition(":")
    if kind == "client_ip":
        return client_ip.encode("ascii")
    wanted = name.lower().encode("ascii")
    if kind == "header":
        return next((value for field, value in request.headers if field == wanted), b"")
    for field, value in request.headers:
        if field == b"cookie":
            for pair in value.split(b";"):
                cookie, _, cookie_value = pair.strip().partition(b"=")
                if cookie == name.encode("ascii"):
                    return cookie_value
    return client_ip.encode("ascii")  # no cookie yet: at least this client sticks
