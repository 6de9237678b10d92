"""Per-merchant rate limit shared by every worker process, kept in Redis.

Two structures per merchant, updated atomically by one Lua script on Redis's own clock
(worker clocks may drift):

- a schedule (GCRA theoretical arrival time): a refund that cannot go now books the next
  free slot and is re-queued to arrive exactly then, so a backlog is walked through once,
  in order, without holding worker threads or re-checking every message again and again;
- a sliding one-second window of actual sends, so that even when workers fall behind and
  booked slots bunch up, the gateway never sees more than the limit in any second.

A gateway 429 pauses the merchant for its Retry-After across all workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import redis.asyncio as aioredis

# The window is a little longer than a second: a send counted on Redis's clock reaches the
# gateway some milliseconds later, and the gateway's own one-second window must never see more.
WINDOW_MS = 1050

_ACQUIRE = """
local WINDOW_MS = tonumber(ARGV[4])
local sched, window, pause = KEYS[1], KEYS[2], KEYS[3]
local interval = tonumber(ARGV[1])
local per_window = tonumber(ARGV[2])
local slot = tonumber(ARGV[3])          -- a slot booked earlier, or -1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = redis.call('PTTL', pause)
if paused > 0 then
  return {paused, -1}
end
redis.call('ZREMRANGEBYSCORE', window, '-inf', now - WINDOW_MS)
local tat = tonumber(redis.call('GET', sched) or now)
if tat < now then tat = now end
local room = redis.call('ZCARD', window) < per_window
if room and (slot >= 0 or tat <= now) then
  redis.call('ZADD', window, now, now .. ':' .. redis.call('INCR', window .. ':seq'))
  redis.call('PEXPIRE', window, 2 * WINDOW_MS)
  redis.call('PEXPIRE', window .. ':seq', 2000)
  if slot < 0 then
    redis.call('SET', sched, tostring(tat + interval), 'PX', math.ceil(interval) + 60000)
  end
  return {0, -1}
end
if slot >= 0 then
  -- a booked slot arrived while the window is full: wait for the oldest send to age out
  local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
  local wait = 1
  if oldest[2] then wait = math.max(1, tonumber(oldest[2]) + WINDOW_MS - now) end
  return {wait, slot}
end
redis.call('SET', sched, tostring(tat + interval), 'PX', math.ceil(tat + interval - now) + 60000)
return {math.max(1, tat - now), tat}
"""


@dataclass(frozen=True)
class Decision:
    wait_ms: int  # 0: send now
    slot_ms: int | None  # the booked slot a re-queued refund owns, if any


class RateLimiter:
    def __init__(self, client: aioredis.Redis, *, prefix: str = "refunds:rate:"):
        self._client = client
        self._script = client.register_script(_ACQUIRE)
        self._prefix = prefix

    def _keys(self, merchant_id: str) -> list[str]:
        base = self._prefix + merchant_id
        return [base + ":sched", base + ":window", base + ":pause"]

    async def acquire(self, merchant_id: str, per_second: Decimal, *, slot_ms: int | None = None) -> Decision:
        """May this merchant's next request go now? If not, how long to wait, and which slot it owns."""
        rate = float(per_second)  # a rate, not money
        per_window = max(1, math.floor(rate))
        wait, slot = await self._script(
            keys=self._keys(merchant_id),
            args=[WINDOW_MS / rate, per_window, -1 if slot_ms is None else slot_ms, WINDOW_MS],
        )
        return Decision(int(wait), None if int(slot) < 0 else int(slot))

    async def pause(self, merchant_id: str, seconds: float) -> None:
        """The gateway said 429: hold every worker's requests for this merchant for Retry-After."""
        await self._client.set(self._keys(merchant_id)[2], "1", px=max(1, int(seconds * 1000)))
