"""The per-merchant rate limit against a real Redis: strict windows, booked slots, pauses."""

import asyncio
import time
from decimal import Decimal

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import redis.exceptions

from refunds.ratelimit import SHORT_WAIT_MS, WINDOW_MS, RateLimiter


@pytest_asyncio.fixture
async def limiter(redis_url):
    client = aioredis.from_url(redis_url)
    for key in await client.keys("test-rate:*"):
        await client.delete(key)
    yield RateLimiter(client, prefix="test-rate:")
    await client.aclose()


async def drain_backlog(limiter, merchant, rate, count):
    """Act like workers: each refund asks for its turn, and a deferred one comes back at its
    booked slot; a refund whose turn came asks for room in the window as its request leaves."""
    sent = []

    async def one():
        slot = None
        while True:
            decision = await limiter.acquire(merchant, Decimal(rate), slot_ms=slot)
            if decision.wait_ms == 0:
                assert await limiter.permit(merchant, Decimal(rate)) == 0
                sent.append(time.monotonic())
                return
            slot = decision.slot_ms
            await asyncio.sleep(decision.wait_ms / 1000)

    await asyncio.gather(*(one() for _ in range(count)))
    return sorted(sent)


def max_in_any_second(times):
    return max(sum(1 for t in times if start <= t < start + 1.0) for start in times)


@pytest.mark.slow
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
    sent = await drain_backlog(limiter, "m-quiet", 10, 5)  # ~0.44 s alone; behind m-busy's 2/s, over 2.5 s
    assert len(sent) == 5 and time.monotonic() - started < 2.0
    backlog.cancel()


async def test_gateway_429_pauses_the_merchant_for_every_worker(limiter):
    paused_at = time.monotonic()
    await limiter.pause("m-429", 0.5)
    decision = await limiter.acquire("m-429", Decimal(100))
    asked_ms = (time.monotonic() - paused_at) * 1000  # however long the two round trips took
    assert 500 - asked_ms - 5 <= decision.wait_ms <= 500
    await asyncio.sleep(0.55)
    assert (await limiter.acquire("m-429", Decimal(100))).wait_ms == 0


async def test_a_turn_that_comes_soon_is_waited_for_in_place_and_a_later_one_is_a_slot(limiter):
    started = time.monotonic()
    assert (await limiter.admit("m-soon", Decimal(20))).wait_ms == 0
    assert (await limiter.admit("m-soon", Decimal(20))).wait_ms == 0  # its turn 55 ms after the first: waited here
    assert 0.05 <= time.monotonic() - started <= 2.0
    assert (await limiter.admit("m-later", Decimal(2))).wait_ms == 0
    later = await limiter.admit("m-later", Decimal(2))  # ~525 ms away: re-queue to arrive at its slot
    assert later.wait_ms > SHORT_WAIT_MS and later.slot_ms is not None


@pytest.mark.slow
async def test_permit_counts_each_request_and_waits_in_place_for_room_in_the_window(limiter):
    started = time.monotonic()  # before the first request is counted: the eleventh waits a window from it
    booking = await limiter.book("m-full", Decimal(10), 11)
    for slot in booking.slots_ms[:10]:  # ten turns taken together (bunched slots): ten requests fill the window
        assert (await limiter.acquire("m-full", Decimal(10), slot_ms=slot)).wait_ms == 0
        assert await limiter.permit("m-full", Decimal(10)) == 0
    assert (await limiter.acquire("m-full", Decimal(10), slot_ms=booking.slots_ms[10])).wait_ms == 0
    assert await limiter.permit("m-full", Decimal(10)) == 0  # the eleventh leaves when the first ages out
    assert (WINDOW_MS - 5) / 1000 <= time.monotonic() - started <= 3.0


async def test_permit_does_not_wait_out_a_pause_longer_than_a_window(limiter):
    await limiter.pause("m-paused", 3)
    started = time.monotonic()
    wait = await limiter.permit("m-paused", Decimal(10))
    assert 2000 <= wait <= 3000 and time.monotonic() - started < 1.5  # answered, not waited out (3 s)


def script_calls(limiter) -> list[str]:
    """The names of the limiter's script calls from now on, in order (its own: the server's command
    counts include other clients')."""
    calls = []
    for name in ("_acquire", "_permit"):
        script = getattr(limiter, name)

        async def counted(*args, _script=script, _name=name, **kwargs):
            calls.append(_name)
            return await _script(*args, **kwargs)
        setattr(limiter, name, counted)
    return calls


async def test_askers_at_once_share_a_script_call_and_are_counted_in_turn(limiter):
    """A worker's refunds in flight ask together: one round trip for many, and the same
    answers as one by one (each turn booked once, the window counted once per request)."""
    calls = script_calls(limiter)
    turns = await asyncio.gather(*(limiter.acquire("m-together", Decimal(10)) for _ in range(12)),
                                 limiter.acquire("m-alone", Decimal(10)))
    *together, alone = turns
    assert together[0].wait_ms == 0 and alone.wait_ms == 0  # the first of each merchant goes now
    slots = [turn.slot_ms for turn in together[1:]]
    assert None not in slots and len(set(slots)) == 11 and slots == sorted(slots)  # one slot each, in order
    assert all(b - a in (WINDOW_MS // 10, WINDOW_MS // 10 + 1) for a, b in zip(slots, slots[1:]))

    assert await asyncio.gather(*(limiter.permit("m-window", Decimal(10)) for _ in range(10))) == [0] * 10
    assert await limiter._client.zcard("test-rate:m-window:window") == 10  # each request counted once
    assert 2 <= len(calls) <= 4 and set(calls) == {"_acquire", "_permit"}  # 23 askers: a call or two each way


async def test_an_askers_broken_key_fails_that_asker_alone_and_the_others_of_its_call_are_answered(limiter):
    """A key of the wrong type or value (written by hand, say) makes Redis raise inside the shared
    script: only the asker whose key it is gets the error; the others' turns and permits stand."""
    calls = script_calls(limiter)
    await limiter._client.set("test-rate:m-broken:sched", "not a time")
    await limiter._client.set("test-rate:m-broken:window", "not a sorted set")

    turns = await asyncio.gather(limiter.acquire("m-fine", Decimal(10)), limiter.acquire("m-broken", Decimal(10)),
                                 limiter.acquire("m-fine", Decimal(10)), return_exceptions=True)
    first, broken, second = turns
    assert isinstance(broken, redis.exceptions.ResponseError), broken
    assert first.wait_ms == 0 and second.slot_ms is not None and second.wait_ms > 0  # booked one after the other

    permits = await asyncio.gather(limiter.permit("m-fine", Decimal(10)), limiter.permit("m-broken", Decimal(10)),
                                   limiter.permit("m-fine", Decimal(10)), return_exceptions=True)
    assert permits[0] == 0 and permits[2] == 0 and isinstance(permits[1], redis.exceptions.ResponseError), permits
    assert "WRONGTYPE" in str(permits[1])
    assert await limiter._client.zcard("test-rate:m-fine:window") == 2  # both counted
    assert calls == ["_acquire", "_permit"]  # each question was one call shared by the three askers
