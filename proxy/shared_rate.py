"""The request rate per client shared by every process of every instance through Redis:
one Lua script per request (GCRA: the bucket as one timestamp per client, expiring when it is
full again). Its own module so that only configurations using it import redis."""

from __future__ import annotations

import redis

from proxy.certs.redis_store import redis_client
from proxy.config import StorageConfig

SHARED_TIMEOUT = 0.25  # seconds a request waits for Redis before its process decides alone

# GCRA (the generic cell rate algorithm) in one round trip: KEYS[1] holds the "theoretical
# arrival time" of the client's next request in microseconds of Redis's clock; ARGV[1] is
# the interval between requests (µs), ARGV[2] the burst. Returns 0 (go ahead, counted) or
# the microseconds until a request would be allowed.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - interval * tonumber(ARGV[2])
if allowed_at > now then return math.ceil(allowed_at - now) end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return 0
"""


class SharedRate:
    """The request rate per client, counted in Redis for every process sharing it."""

    unavailable: type[Exception] = redis.RedisError  # what `wait` raises when Redis is away

    def __init__(self, storage: StorageConfig) -> None:
        self.storage = storage
        self._client = redis_client(storage, SHARED_TIMEOUT)
        self._gcra = self._client.register_script(_GCRA)
        self._prefix = f"{storage.prefix}rate:"

    def wait(self, key: str, rate: float, burst: int) -> float:
        """0 when a request of `key` may go ahead (counted) at `rate` per second with
        `burst`, else the seconds until one may; blocking, RedisError when Redis does not
        answer."""
        micros = self._gcra(keys=[self._prefix + key], args=[round(1_000_000 / rate), burst])
        return int(micros) / 1_000_000

    def close(self) -> None:
        self._client.close()
