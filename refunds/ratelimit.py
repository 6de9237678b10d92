"""Per-merchant rate limit shared by every worker process and producer, kept in Redis.

Two structures per merchant, updated atomically by Lua scripts on Redis's own clock
(worker and producer clocks may drift):

- a schedule (GCRA theoretical arrival time): each refund owns one slot of it. Producers
  book the slots of the refunds they hand over (``book``, several refunds of a merchant in
  one call) and enqueue each message to arrive at its slot, so a large merchant's backlog
  waits in dramatiq's delay queue instead of in front of everyone else's refunds. A
  refund that comes without a slot (approvals, the outbox sweep, a producer without a
  pool) books one when a worker first asks (``acquire``) and, if it cannot go now, is
  re-queued to arrive exactly then: a backlog is walked through once, in order;
- a sliding one-second window of actual sends, counted by ``permit`` the moment a request
  leaves, for every refund, booked or not, so that even when workers fall behind, booked
  slots bunch up, or the steps between admission and the request (the claim, a token) take
  different times, the gateway never sees more than the limit in any second.

A gateway 429 pauses the merchant for its Retry-After across all workers; slots booked
during a pause start after it.

A worker asks two questions (``workers.sender``). ``admit``, before it claims a refund: is
it this refund's turn in the schedule? It waits in place for a turn that comes within
``SHORT_WAIT_MS`` (a re-queue hop costs more than such a wait) and otherwise answers how long
to wait; the worker then re-queues the refund to arrive at its slot, with jitter only when it
owns no slot, so that refunds paused together do not come back together. ``permit``, just
before each request: is there room in the window? It waits in place for it (the claimed
refund is held for at most a window) and counts the request. The questions asked at once
share one script call; a key Redis cannot read as a schedule or a window fails the one asker it
belongs to, not the others of the call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .coalesce import Coalescer

T = TypeVar("T")

# The window is a little longer than a second: a request counted as it leaves (on Redis's clock)
# reaches the gateway's own counter later by a delay that varies (our event loop, the network,
# the gateway's queue: up to ~100 ms seen on a loaded 2-core machine), and the gateway's
# one-second window must never see more. The margin costs a limit of 5/s a tenth of its rate; a
# 429 would cost the merchant a pause of a second or more.
WINDOW_MS = 1100
# ``permit`` waits in place this long at most: a full window frees room within WINDOW_MS;
# only a pause (a gateway 429) lasts longer.
MAX_PERMIT_WAIT_MS = WINDOW_MS + 100
# A refund whose merchant's window is full waits for room in place when room comes this soon,
# and at most this long in all, so that a worker never holds a refund long.
SHORT_WAIT_MS = 100
MAX_WAIT_IN_PLACE_MS = 500

# What both scripts share: Redis's clock, the pause, and the schedule's next free slot.
# A schedule key is forgotten a minute after its last booked slot has passed.
_SCHEDULE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function paused_for(pause)
  local ms = redis.call('PTTL', pause)
  if ms > 0 then return ms end
  return 0
end
local function next_free(sched, from)
  local tat = tonumber(redis.call('GET', sched) or from)
  if tat < from then return from end
  return tat
end
local function keep_schedule(sched, tat)
  redis.call('SET', sched, tostring(tat), 'PX', math.ceil(tat - now) + 60000)
end
-- one(i) for each of `count` askers, an error (a key of the wrong type or value) its own answer
local function each(count, one)
  local answers = {}
  for i = 1, count do
    local ok, answer = pcall(one, i)
    if ok then
      answers[i] = answer
    else
      answers[i] = {err = type(answer) == 'table' and answer.err or tostring(answer)}
    end
  end
  return answers
end
"""

# For each asker (a merchant's schedule and pause keys, its interval between slots and the slot
# it booked earlier or -1): {0, -1} its turn now, {wait, -1} a pause, or {wait, slot} a slot
# booked for it further on. Askers of one merchant in one call book one after the other.
_ACQUIRE = _SCHEDULE + """
return each(#ARGV / 2, function(i)
  local sched, pause = KEYS[2 * i - 1], KEYS[2 * i]
  local interval, slot = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local paused = paused_for(pause)
  if paused > 0 then
    return {paused, -1}
  elseif slot >= 0 then
    return {0, -1}                      -- its turn, booked earlier: the window is permit's
  end
  local tat = next_free(sched, now)
  keep_schedule(sched, tat + interval)
  if tat <= now then
    return {0, -1}
  end
  return {math.max(1, tat - now), tat}
end)
"""

# For each asker (a merchant's window and pause keys, and its sends per window): counts its
# request in the window if there is room (0), else how long until there is, or how long the
# merchant's pause lasts. Askers of one merchant in one call are counted one after the other.
_PERMIT = _SCHEDULE + """
local WINDOW_MS = tonumber(ARGV[1])
return each(#ARGV - 1, function(i)
  local window, pause = KEYS[2 * i - 1], KEYS[2 * i]
  local per_window = tonumber(ARGV[i + 1])
  local paused = paused_for(pause)
  if paused > 0 then
    return paused
  end
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - WINDOW_MS)
  if redis.call('ZCARD', window) < per_window then
    redis.call('ZADD', window, now, now .. ':' .. redis.call('INCR', window .. ':seq'))
    redis.call('PEXPIRE', window, 2 * WINDOW_MS)
    redis.call('PEXPIRE', window .. ':seq', 2000)
    return 0
  end
  local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + WINDOW_MS - now)
end)
"""

# Books the next `count` slots; never touches the window (permit counts it at send time).
_BOOK = _SCHEDULE + """
local sched, pause = KEYS[1], KEYS[3]
local interval = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local tat = next_free(sched, now + paused_for(pause))
local booked = {now}
for i = 1, count do
  booked[i + 1] = tat                   -- Redis returns it truncated to whole milliseconds
  tat = tat + interval
end
keep_schedule(sched, tat)
return booked
"""


def _no_keys(_asker) -> tuple:
    return ()


def _own(answer: T | ResponseError) -> T:
    """An asker's answer from a shared script call; its own error (one of its keys holds a value of
    the wrong type) is raised to it alone, the other askers of the call have theirs."""
    if isinstance(answer, ResponseError):
        raise answer
    return answer


def _pace(per_second: Decimal) -> tuple[float, int]:
    """The schedule's interval between slots (ms) and the sends one window allows, for a rate."""
    rate = float(per_second)  # a rate, not money
    return WINDOW_MS / rate, max(1, math.floor(rate))


@dataclass(frozen=True)
class Decision:
    wait_ms: int  # 0: send now
    slot_ms: int | None  # the booked slot a re-queued refund owns, if any

    @classmethod
    def of(cls, wait_ms, slot_ms) -> "Decision":
        """From the acquire script's answer, where a slot of -1 is none."""
        return cls(int(wait_ms), None if int(slot_ms) < 0 else int(slot_ms))


@dataclass(frozen=True)
class Booking:
    now_ms: int  # Redis's clock when the slots were booked
    slots_ms: tuple[int, ...]  # one per refund, in order, ms since the epoch on Redis's clock


class RateLimiter:
    """The calls made at once (a worker's refunds in flight) share one script call each
    (``refunds.coalesce``): a round trip to Redis costs more than the script's work."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "refunds:rate:"):
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._permit = client.register_script(_PERMIT)
        self._book = client.register_script(_BOOK)
        self._prefix = prefix
        # askers of one merchant may share a call (the scripts count them in turn): no keys
        self._turns = Coalescer(self._acquire_many, keys=_no_keys, name="rate-limit turns")
        self._permits = Coalescer(self._permit_many, keys=_no_keys, name="rate-limit permits")

    def _keys(self, merchant_id: str) -> list[str]:
        base = self._prefix + merchant_id
        return [base + ":sched", base + ":window", base + ":pause"]

    async def acquire(self, merchant_id: str, per_second: Decimal, *, slot_ms: int | None = None) -> Decision:
        """Is it this merchant's refund's turn? If not, how long to wait, and which slot it owns.

        With ``slot_ms`` (a slot booked earlier, by ``book`` or a previous ``acquire``) only a
        pause is checked: the slot is never booked twice.
        """
        interval, _ = _pace(per_second)
        return _own(await self._turns((merchant_id, interval, -1 if slot_ms is None else slot_ms)))

    async def _acquire_many(self, askers: list[tuple[str, float, int]]) -> list[Decision | ResponseError]:
        keys, args = [], []
        for merchant_id, interval, slot in askers:
            sched, _, pause = self._keys(merchant_id)
            keys += [sched, pause]
            args += [interval, slot]
        turns = await self._acquire(keys=keys, args=args)
        return [turn if isinstance(turn, ResponseError) else Decision.of(*turn) for turn in turns]

    async def permit(self, merchant_id: str, per_second: Decimal) -> int:
        """Just before a request: wait in place for room in the merchant's window and count the
        request (0), or answer how long a pause still lasts when that is longer than a window."""
        _, per_window = _pace(per_second)
        waited = 0
        while True:
            wait = _own(await self._permits((merchant_id, per_window)))
            if not wait or waited + wait > MAX_PERMIT_WAIT_MS:
                return wait
            await asyncio.sleep(wait / 1000)
            waited += wait

    async def _permit_many(self, askers: list[tuple[str, int]]) -> list[int | ResponseError]:
        keys, args = [], [WINDOW_MS]
        for merchant_id, per_window in askers:
            _, window, pause = self._keys(merchant_id)
            keys += [window, pause]
            args.append(per_window)
        waits = await self._permit(keys=keys, args=args)
        return [wait if isinstance(wait, ResponseError) else int(wait) for wait in waits]

    async def admit(self, merchant_id: str, per_second: Decimal, *, slot_ms: int | None = None) -> Decision:
        """``acquire``, after waiting in place for room that comes soon: go now (``wait_ms`` 0), or
        how long to wait and the slot the refund owns meanwhile."""
        waited = 0
        while True:
            decision = await self.acquire(merchant_id, per_second, slot_ms=slot_ms)
            wait = decision.wait_ms
            if not wait or decision.slot_ms is None or wait > SHORT_WAIT_MS or waited + wait > MAX_WAIT_IN_PLACE_MS:
                return decision
            await asyncio.sleep(wait / 1000)
            waited += wait
            slot_ms = decision.slot_ms

    async def book(self, merchant_id: str, per_second: Decimal, count: int) -> Booking:
        """Book the next ``count`` slots of a merchant's schedule (refunds handed over together)."""
        (booking,) = await self.book_many([(merchant_id, per_second, count)])
        return booking

    async def book_many(self, requests: Sequence[tuple[str, Decimal, int]]) -> list[Booking]:
        """``book`` for several merchants (merchant, rate per second, count), in one pipelined write."""
        if len(requests) == 1:  # the common case: one script call, no pipeline's SCRIPT EXISTS first
            answers = [await self._book(keys=self._keys(requests[0][0]), args=self._book_args(*requests[0][1:]))]
        else:
            pipe = self._client.pipeline(transaction=False)
            for merchant_id, per_second, count in requests:
                await self._book(keys=self._keys(merchant_id), args=self._book_args(per_second, count), client=pipe)
            answers = await pipe.execute()
        return [Booking(int(now), tuple(int(slot) for slot in slots)) for now, *slots in answers]

    @staticmethod
    def _book_args(per_second: Decimal, count: int) -> list:
        interval, _ = _pace(per_second)
        return [interval, count]

    async def pause(self, merchant_id: str, seconds: float) -> None:
        """The gateway said 429: hold every worker's requests for this merchant for Retry-After."""
        await self._client.set(self._keys(merchant_id)[2], "1", px=max(1, int(seconds * 1000)))
