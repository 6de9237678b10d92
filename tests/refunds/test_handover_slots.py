"""Booking rate-limit slots at hand-over, against real Redis and Postgres.

A refund handed over with its merchant's rate limit (and a pool) owns its slot in the
merchant's schedule from the start and waits for it in dramatiq's delay queue, so a
large merchant's backlog never sits in the ready queue in front of a small merchant's
refunds (see refunds.delivery).
"""

import asyncio
import json
import logging
import threading
import uuid
from datetime import datetime
from decimal import Decimal

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from refunds.delivery import QUEUE, RECORD_SLOT_AHEAD_MS, SEND_REFUND, Courier, deliver_async
from producers.enqueue import accept_refund, enqueue_refund, hand_over
from refunds import db as dbmod
from refunds.ratelimit import WINDOW_MS, RateLimiter
from tests.helpers import paid

REDIS_DB = 10  # module_redis_url: a Redis database of our own (schedules and queues of these tests only)
DELAY_QUEUE = QUEUE + ".DQ"


@pytest_asyncio.fixture
async def limiter(queue, module_redis_url):
    """The producers' and workers' rate limiter (default key prefix) on this module's emptied database."""
    client = aioredis.from_url(module_redis_url)
    yield RateLimiter(client)
    await client.aclose()


@pytest_asyncio.fixture
async def pool(database_url):
    pool = await dbmod.create_pool(database_url, max_size=5)
    yield pool
    await pool.close()



def refund_request(merchant: str, external_ref: str) -> dict:
    return dict(merchant_id=merchant, original_transaction_id="CIP-1", amount="1.00", currency="PEN",
                external_ref=external_ref)


def messages(queue, queue_name: str) -> list[dict]:
    """The messages waiting in one dramatiq queue, in queue order."""
    bodies = queue.hgetall(f"dramatiq:{queue_name}.msgs")
    return [json.loads(bodies[message_id]) for message_id in queue.lrange(f"dramatiq:{queue_name}", 0, -1)]


def ms(moment: datetime) -> float:
    return moment.timestamp() * 1000


# (a) the book operation


async def test_book_spaces_slots_by_the_interval_from_now_and_continues(limiter):
    first = await limiter.book("m-five", Decimal(5), 4)
    assert first.slots_ms[0] == first.now_ms
    assert [b - a for a, b in zip(first.slots_ms, first.slots_ms[1:])] == [WINDOW_MS // 5] * 3
    second = await limiter.book("m-five", Decimal(5), 2)
    step = WINDOW_MS // 5
    assert second.slots_ms == (first.slots_ms[-1] + step, first.slots_ms[-1] + 2 * step)
    # the schedule key outlives its last slot by a minute, as acquire leaves it
    ttl = await limiter._client.pttl("refunds:rate:m-five:sched")
    assert 60_000 < ttl <= second.slots_ms[-1] + step - second.now_ms + 60_000


async def test_merchants_are_booked_independently_in_one_call(limiter):
    await limiter.book("m-busy", Decimal(1), 10)  # ten seconds of backlog
    busy, quiet = await limiter.book_many([("m-busy", Decimal(1), 1), ("m-quiet", Decimal("2.5"), 2)])
    assert busy.slots_ms[0] >= busy.now_ms + 9 * WINDOW_MS
    assert quiet.slots_ms == (quiet.now_ms, quiet.now_ms + int(WINDOW_MS / 2.5))


async def test_a_paused_merchant_is_booked_after_the_pause(limiter):
    await limiter.pause("m-429", 0.5)
    booking = await limiter.book("m-429", Decimal(10), 2)
    assert booking.now_ms + 400 <= booking.slots_ms[0] <= booking.now_ms + 500
    assert booking.slots_ms[1] == booking.slots_ms[0] + WINDOW_MS // 10


async def test_a_booked_slot_is_never_booked_again_and_its_request_is_counted_as_it_leaves(limiter):
    booking = await limiter.book("m-once", Decimal(10), 3)
    assert (await limiter.acquire("m-once", Decimal(10), slot_ms=booking.slots_ms[2])).wait_ms == 0
    assert await limiter._client.zcard("refunds:rate:m-once:window") == 0  # admitted, not yet sent
    assert await limiter.permit("m-once", Decimal(10)) == 0
    assert await limiter._client.zcard("refunds:rate:m-once:window") == 1  # the request was counted
    after = await limiter.book("m-once", Decimal(10), 1)
    assert after.slots_ms[0] == booking.slots_ms[2] + WINDOW_MS // 10  # acquire booked nothing more


# (b) hand-over through enqueue_refund


async def test_hand_over_books_slots_and_delays_messages_to_them(db, pool, make_merchant, queue):
    await make_merchant("m-big", rate_limit=Decimal(10))
    await paid(db, "m-big", amount="1000.00")
    # accepted first, then handed over at one moment (enqueue_refund's two steps): their bookings
    # follow each other within a round trip to Redis. Handed over as each accept came back, a
    # loaded machine could leave a gap longer than the schedule booked so far (110 ms a refund):
    # the schedule then starts again from "now", as it should, and the slots below are not one run
    results = await asyncio.gather(*(accept_refund(pool, **refund_request("m-big", f"BIG-{n}")) for n in range(50)))
    assert all(await asyncio.gather(*(hand_over(result, pool) for result in results)))
    assert all(result.created and result.rate_limit == Decimal(10) for result in results)

    ready, delayed = messages(queue, QUEUE), messages(queue, DELAY_QUEUE)
    slot_of = {m["args"][0]: m["kwargs"]["slot_ms"] for m in ready + delayed}
    assert set(slot_of) == {str(result.refund.refund_id) for result in results}
    slots = sorted(slot_of.values())
    assert [b - a for a, b in zip(slots, slots[1:])] == [WINDOW_MS // 10] * 49
    assert [m["kwargs"]["slot_ms"] for m in ready] == [slots[0]]  # due now: the ready queue
    assert {(m["queue_name"], m["actor_name"]) for m in ready} == {(QUEUE, SEND_REFUND)}
    assert "eta" not in ready[0]["options"]
    for message in delayed:  # what RedisBroker.enqueue(message, delay=slot - now) writes
        assert message["queue_name"] == DELAY_QUEUE and message["actor_name"] == SEND_REFUND
        assert message["options"] == {"redis_message_id": message["options"]["redis_message_id"],
                                      "eta": message["kwargs"]["slot_ms"]}

    delivered_at = dict(await db.fetch("SELECT refund_id::text, delivered_at FROM refunds"))
    recorded = 0
    for refund_id, slot in slot_of.items():
        ahead = slot - slots[0]  # the first slot is the first booking's now
        if delivered_at[refund_id] is not None:
            assert abs(ms(delivered_at[refund_id]) - slot) <= 1
            assert ahead > RECORD_SLOT_AHEAD_MS
            recorded += 1
        else:  # near slots are not recorded; far ones must be (give batches a second to be booked)
            assert ahead <= RECORD_SLOT_AHEAD_MS + 1000
    assert recorded >= 50 - (RECORD_SLOT_AHEAD_MS + 1000) // (WINDOW_MS // 10) - 1


async def test_without_a_pool_a_refund_is_delivered_unbooked(db, make_merchant, queue, limiter):
    """As producers.http's hand_over(result) without a pool: the ready queue, no slot, no delivered_at."""
    await make_merchant("m-plain", rate_limit=Decimal(10))
    await paid(db, "m-plain", amount="1000.00")
    results = [await accept_refund(db, **refund_request("m-plain", f"PLAIN-{n}")) for n in range(3)]
    assert [await hand_over(result) for result in results] == [True] * 3
    ready = messages(queue, QUEUE)
    assert [m["args"][0] for m in ready] == [str(result.refund.refund_id) for result in results]
    assert all(m["kwargs"] == {} and "eta" not in m["options"] for m in ready)
    assert messages(queue, DELAY_QUEUE) == []
    assert await limiter._client.exists("refunds:rate:m-plain:sched") == 0
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE delivered_at IS NOT NULL") == 0


async def test_a_failed_delivered_at_update_loses_no_refund(database_url, queue, limiter, caplog):
    """delivered_at is a hint for the outbox sweep: if it cannot be written the message still goes."""
    await limiter.book("m-far", Decimal(1), 10)  # this merchant's next slot is ten seconds away
    gone = await dbmod.connect(database_url)
    await gone.close()
    refund_id = str(uuid.uuid4())
    with caplog.at_level(logging.WARNING, logger="refunds.delivery"):
        assert await deliver_async(refund_id, merchant_id="m-far", rate_limit=Decimal(1), pool=gone)
    [message] = messages(queue, DELAY_QUEUE)
    assert message["args"] == [refund_id] and message["options"]["eta"] == message["kwargs"]["slot_ms"]
    assert "delivered_at of 1 refunds booked ahead not recorded" in caplog.text


async def test_redis_away_while_booking_postpones_the_batch(monkeypatch, pool, queue):
    async def away(self, requests):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(RateLimiter, "book_many", away)
    async with Courier() as courier:
        results = await asyncio.gather(*(
            courier.deliver(str(uuid.uuid4()), merchant_id="m-away", rate_limit=Decimal(10), pool=pool)
            for _ in range(3)))
    assert results == [False] * 3  # the outbox sweep delivers them later
    assert messages(queue, QUEUE) == [] and messages(queue, DELAY_QUEUE) == []


# (c) a real dramatiq worker on the workers' broker takes a delayed message when it is due


@pytest.mark.slow
async def test_a_dramatiq_worker_runs_booked_messages_at_their_slots(db, pool, make_merchant, queue, module_redis_url):
    import dramatiq
    from dramatiq.common import current_millis

    from workers.broker import PromptRedisBroker

    await make_merchant("m-slow", rate_limit=Decimal(2))
    await paid(db, "m-slow", amount="1000.00")
    broker = PromptRedisBroker(url=module_redis_url, middleware=[])
    ran: list[tuple[str, int | None, int]] = []
    all_ran = threading.Event()

    @dramatiq.actor(actor_name=SEND_REFUND, queue_name=QUEUE, broker=broker)
    def send_refund(refund_id: str, slot_ms: int | None = None) -> None:
        ran.append((refund_id, slot_ms, current_millis()))
        if len(ran) == 3:
            all_ran.set()

    worker = dramatiq.Worker(broker, worker_threads=1)  # dramatiq's default worker timeout: 1 s
    worker.start()
    try:
        results = await asyncio.gather(*(
            enqueue_refund(pool, **refund_request("m-slow", f"SLOW-{n}")) for n in range(3)))
        # two wait for their slots in the delay queue (held by the worker, unacked, until then)
        waiting = [json.loads(body) for body in queue.hvals(f"dramatiq:{DELAY_QUEUE}.msgs")]
        assert len(waiting) == 2 and all(m["options"]["eta"] == m["kwargs"]["slot_ms"] for m in waiting)
        assert await asyncio.to_thread(all_ran.wait, 5)
    finally:
        await asyncio.to_thread(worker.stop)
        broker.close()
    assert {refund_id for refund_id, _, _ in ran} == {str(result.refund.refund_id) for result in results}
    slots = sorted(slot for _, slot, _ in ran)
    assert [b - a for a, b in zip(slots, slots[1:])] == [WINDOW_MS // 2] * 2
    for _, slot, at in ran:
        # at its slot, not before; late by two polls at most (delay queue, then ready queue), each
        # ≤ 100 ms with the workers' broker where dramatiq's own would sleep up to its 1 s timeout
        assert slot - 5 <= at <= slot + 400
    assert messages(queue, QUEUE) == [] and messages(queue, DELAY_QUEUE) == []  # acked: gone
