"""Per-merchant rate limit shared by every worker process, kept in Redis.

GCRA (generic cell rate algorithm): one key per merchant holds the theoretical arrival
time of the next request. A request either fits now or learns exactly how long to wait,
so an over-limit refund is re-queued with that delay instead of holding a worker thread.
Redis's own clock is used, so worker clocks may drift.
"""

from __future__ import annotations

from decimal import Decimal

import redis.asyncio as aioredis

_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed_at = tat - interval * burst
if now < allowed_at then
  return allowed_at - now
end
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(interval * (burst + 1)) + 1000)
return 0
"""


class RateLimiter:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "refunds:rate:"):
        self._script = client.register_script(_GCRA)
        self._prefix = prefix

    async def reserve(self, merchant_id: str, per_second: Decimal, *, burst: int = 1) -> int:
        """Take a slot for one request now; 0 if granted, else the milliseconds to wait."""
        interval_ms = 1000.0 / float(per_second)
        wait = await self._script(keys=[self._prefix + merchant_id], args=[interval_ms, burst])
        return int(wait)
