"""The per-merchant rate limit against a real Redis: strict windows, booked slots, pauses."""

import asyncio
import time
from decimal import Decimal

import pytest_asyncio
import redis.asyncio as aioredis

from refunds.ratelimit import MAX_WAIT_IN_PLACE_MS, SHORT_WAIT_MS, WINDOW_MS, RateLimiter


@pytest_asyncio.fixture
async def limiter(redis_url):
    client = aioredis.from_url(redis_url)
    for key in await client.keys("test-rate:*"):
        await client.delete(key)
    yield RateLimiter(client, prefix="test-rate:")
    await client.aclose()


async def drain_backlog(limiter, merchant, rate, count):
    """Act like workers: each refund asks, and a deferred one comes back at its booked slot."""
    sent = []

    async def one():
        slot = None
        while True:
            decision = await limiter.acquire(merchant, Decimal(rate), slot_ms=slot)
            if decision.wait_ms == 0:
                sent.append(time.monotonic())
                return
            slot = decision.slot_ms
            await asyncio.sleep(decision.wait_ms / 1000)

    await asyncio.gather(*(one() for _ in range(count)))
    return sorted(sent)


def max_in_any_second(times):
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times)


async def test_backlog_never_exceeds_the_limit_in_any_second_and_uses_it(limiter):
    started = time.monotonic()
    sent = await drain_backlog(limiter, "m-small", 5, 20)
    elapsed = time.monotonic() - started
    assert len(sent) == 20
    assert max_in_any_second(sent) <= 5 + 1
    assert elapsed < 20 / 5 + 1.5  # close to the allowance, not far below it


async def test_merchants_do_not_share_a_limit(limiter):
    backlog = asyncio.create_task(drain_backlog(limiter, "m-busy", 2, 10))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    sent = await drain_backlog(limiter, "m-quiet", 10, 5)
    assert len(sent) == 5 and time.monotonic() - started < 1.0
    backlog.cancel()


async def test_gateway_429_pauses_the_merchant_for_every_worker(limiter):
    await limiter.pause("m-429", 0.5)
    decision = await limiter.acquire("m-429", Decimal(100))
    assert 300 <= decision.wait_ms <= 500
    await asyncio.sleep(0.55)
    assert (await limiter.acquire("m-429", Decimal(100))).wait_ms == 0


async def test_a_booked_refund_meeting_a_full_window_waits_in_place_only_when_room_comes_soon(limiter):
    booking = await limiter.book("m-full", Decimal(10), 11)
    for slot in booking.slots_ms[:10]:  # ten sends fill the one-second window
        assert (await limiter.acquire("m-full", Decimal(10), slot_ms=slot)).wait_ms == 0
    filled = time.monotonic()

    # room comes only when the first send ages out (~1 s): re-queue, do not hold the thread
    decision = await limiter.admit("m-full", Decimal(10), slot_ms=booking.slots_ms[10])
    assert decision.wait_ms > MAX_WAIT_IN_PLACE_MS and decision.slot_ms == booking.slots_ms[10]
    assert time.monotonic() - filled < 0.3

    # room comes within SHORT_WAIT_MS: wait for it here and send
    await asyncio.sleep((WINDOW_MS - SHORT_WAIT_MS / 2) / 1000 - (time.monotonic() - filled))
    waiting = time.monotonic()
    decision = await limiter.admit("m-full", Decimal(10), slot_ms=booking.slots_ms[10])
    assert decision.wait_ms == 0
    assert 0.01 <= time.monotonic() - waiting <= 0.4
