"""The per-merchant rate limit against a real Redis: strict windows, booked slots, pauses."""

import asyncio
import time
from decimal import Decimal

import pytest_asyncio
import redis.asyncio as aioredis

from refunds.ratelimit import RateLimiter


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
