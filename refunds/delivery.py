"""Hand accepted refunds to the workers through Redis (dramatiq messages).

Redis is only a delivery channel: a refund is in Postgres before its message exists,
and the scheduler's outbox sweep re-delivers any refund whose message was lost. A
message sent twice is harmless: the worker's claim on the refund decides.

``deliver`` is the blocking form (workers, scheduler, scripts): dramatiq's own
``RedisBroker.enqueue``. A ``Courier`` is for producers on an event loop, where a
worker-thread hop per refund cost more CPU than the rest of the intake's work: it
gathers the refunds handed over at the same moment and sends them in one pipelined
write on its asyncio Redis client, running dramatiq's own ``dispatch`` Lua script with
the arguments ``RedisBroker.enqueue`` gives it (tests/producers/test_producers.py checks that a
dramatiq consumer reads these messages exactly as its own). If that ever fails for
another reason than Redis being away, it falls back to ``deliver``.

Booking at hand-over: in one FIFO queue, a large merchant's backlog sat in front of
every other merchant's refunds, and each worker had to take, re-check and re-queue
each of its messages before reaching them. So when a refund comes with its merchant,
rate limit and a pool, the courier first books its slot in the merchant's rate-limit
schedule (``refunds.ratelimit``, one call per merchant per batch) and sends its message
with ``slot_ms``: a slot due now goes to the ready queue, a later one to dramatiq's
delay queue with the slot as its eta, exactly as ``RedisBroker.enqueue(message,
delay=...)`` would put it. The worker then only checks the one-second window. A refund
booked more than a few seconds ahead gets its slot as ``delivered_at`` (one UPDATE per
batch), or the outbox sweep would take the waiting backlog for lost messages.

Refunds of one write that are due now travel together, up to ``REFUND_PACK_SIZE`` in one
``send_refunds`` message: a worker fetches, acks and settles them as one, which costs
less than one message each and puts many refunds in flight per worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from uuid import UUID

import asyncpg
import redis
import redis.asyncio as aioredis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name

from .coalesce import Coalescer
from .errors import ConfigError
from .ratelimit import RateLimiter
from .settings import get_settings

QUEUE = "refunds"
SEND_REFUND = "send_refund"
SEND_REFUNDS = "send_refunds"  # several refunds handed over together (see the courier)
WEBHOOKS_QUEUE = "webhooks"  # its own queue: webhook deliveries never wait behind a refund backlog
DELIVER_WEBHOOK = "deliver_webhook"
MAX_BATCH = 256  # refunds per pipelined write
CONNECT_TIMEOUT, SOCKET_TIMEOUT = 2, 5
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)
# A refund booked further ahead than this has its slot recorded as delivered_at. Nearer
# ones reach a worker well within the outbox sweep's grace (30 s by default) anyway.
RECORD_SLOT_AHEAD_MS = 3_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RECORD_SLOTS = """
    UPDATE refunds SET delivered_at = x.at
    FROM unnest($1::uuid[], $2::timestamptz[]) AS x (id, at)
    WHERE refund_id = x.id AND state = 'queued'"""

log = logging.getLogger(__name__)


# Out of a million commands a consumer sends Redis, how many also give a dead process's fetched
# messages back to their queue (dramatiq's maintenance; its default, 1,000, meant a dead worker's
# messages waited about 12 s more for one). A polling consumer sends ten a second, and each
# worker process has four (two queues and their delay queues): about one maintenance a second.
MAINTENANCE_CHANCE = 25_000


def broker_options() -> dict:
    """What each of our dramatiq Redis brokers is made with: the server, and when a silent
    process is presumed dead (WORKER_DEAD_AFTER_SECONDS, instead of dramatiq's 60 s)."""
    settings = get_settings()
    return {"url": settings.require("redis_url"), "heartbeat_timeout": int(settings.worker_dead_after_seconds * 1000),
            "maintenance_chance": MAINTENANCE_CHANCE}


@lru_cache(maxsize=1)
def producer_broker() -> RedisBroker:
    """A broker used only to enqueue (no middleware: workers own retries and limits)."""
    return RedisBroker(**broker_options(), middleware=[], socket_connect_timeout=CONNECT_TIMEOUT,
                       socket_timeout=SOCKET_TIMEOUT)


def send_refund_message(refund_id: UUID | str, *, slot_ms: int | None = None) -> Message:
    """The send_refund message; ``slot_ms``: the rate-limit slot booked for it, if any."""
    return Message(
        queue_name=QUEUE, actor_name=SEND_REFUND, args=(str(refund_id),),
        kwargs={} if slot_ms is None else {"slot_ms": slot_ms}, options={},
    )


def _why(exc: Exception) -> str:
    """A delivery's failure in a log line: a setting's own words (REDIS_URL is not set), else the
    error's class (a client's message may name hosts)."""
    return str(exc) if isinstance(exc, ConfigError) else type(exc).__name__


def deliver(refund_id: UUID | str, *, delay_ms: int | None = None) -> bool:
    """Enqueue one send_refund message; False (and a log line) if Redis is unreachable."""
    try:
        producer_broker().enqueue(send_refund_message(refund_id), delay=delay_ms)
        return True
    except Exception as exc:  # the outbox sweep will deliver it later
        log.warning("delivery of refund %s postponed: %s", refund_id, _why(exc))
        return False


def deliver_webhooks(deliveries: list[tuple[str, UUID]]) -> int:
    """Enqueue one deliver_webhook message per (event_id, endpoint_id); how many went (a delivery
    whose message is lost goes again when its lease runs out: refunds.webhooks)."""
    sent = 0
    for event_id, endpoint_id in deliveries:
        try:
            producer_broker().enqueue(Message(queue_name=WEBHOOKS_QUEUE, actor_name=DELIVER_WEBHOOK,
                                              args=(event_id, str(endpoint_id)), kwargs={}, options={}))
        except Exception as exc:
            log.warning("webhook deliveries postponed: %s", _why(exc))
            break
        sent += 1
    return sent


def deliver_many(refund_ids: list[UUID | str]) -> list[bool]:
    """``deliver`` in order; after the first failure the rest are postponed at once
    (one Redis timeout per batch, not one per refund)."""
    results: list[bool] = []
    ok = True
    for refund_id in refund_ids:
        ok = ok and deliver(refund_id)
        results.append(ok)
    return results


@dataclass(eq=False)
class _Handover:
    """One refund waiting for the next write, and what booking its slot needs."""

    refund_id: str
    merchant_id: str | None = None
    rate_limit: Decimal | None = None  # requests per second
    pool: asyncpg.Pool | asyncpg.Connection | None = None  # where a far slot is recorded as delivered_at

    @property
    def books_a_slot(self) -> bool:
        # Without a pool a far slot could not be recorded, and the outbox sweep would re-deliver
        # the refund while it waits for its slot: such a refund goes unbooked (a worker books it).
        return self.merchant_id is not None and self.rate_limit is not None and self.pool is not None


@dataclass(frozen=True)
class _Slot:
    slot_ms: int  # on Redis's clock
    booked_at_ms: int  # Redis's clock when it was booked

    @property
    def ahead_ms(self) -> int:
        return self.slot_ms - self.booked_at_ms


class Courier:
    """Hands refunds over from an event loop: its Redis client, and the refunds handed over at the
    same moment, written together (``refunds.coalesce.Coalescer``, one write at a time).

    Its owner closes it (``close()``, or ``async with Courier() as courier``) on the loop that used
    it: the intake with its application, a CSV import when the file is done, a ``RefundProducer``
    with its loop. The client is made on the first hand-over, on the loop that makes it.
    """

    def __init__(self) -> None:
        self._writes: Coalescer[_Handover, bool] = Coalescer(
            self._write, keys=lambda handover: (), max_batch=MAX_BATCH, max_inflight=1, name="hand-overs")
        self._broker: RedisBroker | None = None  # the producer broker the client was made for
        self._client: aioredis.Redis | None = None
        self._enqueue_script = None  # dramatiq's own Lua script, registered on this client
        self._limiter: RateLimiter | None = None  # on the same client

    async def __aenter__(self) -> "Courier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def deliver(
        self, refund_id: UUID | str, *, merchant_id: str | None = None, rate_limit: Decimal | None = None,
        pool: asyncpg.Pool | asyncpg.Connection | None = None,
    ) -> bool:
        """Hand one refund over, batched with the other hand-overs of the moment.

        With the refund's merchant, its rate limit (per second) and a pool (or connection) to
        record a far slot as ``delivered_at``, the refund is booked into the merchant's rate-limit
        schedule and arrives at its slot; without any of them it goes to the ready queue unbooked
        and a worker books its slot. False (and a log line) if Redis is unreachable.
        """
        try:
            return await self._writes(_Handover(str(refund_id), merchant_id, rate_limit, pool))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this caller itself is cancelled
            return False  # its write was: the outbox sweep delivers it

    async def close(self) -> None:
        client, self._client, self._broker, self._limiter = self._client, None, None, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing a client whose server is gone
                pass

    async def _write(self, batch: list[_Handover]) -> list[bool]:
        try:
            await self._send(batch)
            return [True] * len(batch)
        except REDIS_AWAY as exc:
            log.warning("delivery of %d refunds postponed: %s", len(batch), type(exc).__name__)
            return [False] * len(batch)
        except Exception as exc:  # slots booked before the failure stay unused: harmless
            log.warning("pipelined delivery failed (%s); delivering one by one", type(exc).__name__)
            return await asyncio.to_thread(deliver_many, [handover.refund_id for handover in batch])

    async def _send(self, batch: list[_Handover]) -> None:
        """Book the slots, then do what ``RedisBroker.enqueue`` does for each message, in one
        pipelined write; then record far slots as delivered_at.

        Redis away after the booking but before the write: those slots are lost (the merchant's
        later refunds wait a little longer than needed), and the outbox sweep delivers these.
        """
        broker = await self._connect()
        slots = await self._book(batch)
        pipe = self._client.pipeline(transaction=False)
        timestamp = int(time.time() * 1000)
        for message in _messages([handover.refund_id for handover in batch], slots):
            message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
            keys, args = enqueue_script_call(broker, message, timestamp)
            await self._enqueue_script(keys=keys, args=args, client=pipe)
        await pipe.execute()
        await _record_slots([(handover, slot) for handover, slot in zip(batch, slots)
                             if slot is not None and slot.ahead_ms > RECORD_SLOT_AHEAD_MS])

    async def _connect(self) -> RedisBroker:
        """The client (and scripts) for the current producer broker; made anew when it changes."""
        broker = producer_broker()
        if self._broker is not broker:  # first use, or REDIS_URL changed (tests do)
            await self.close()
            self._client = aioredis.Redis.from_url(
                get_settings().require("redis_url"), socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
            )
            self._enqueue_script = self._client.register_script(broker.scripts["dispatch"].script)
            self._broker = broker
        return broker

    async def _book(self, batch: list[_Handover]) -> list[_Slot | None]:
        """Each refund's slot in its merchant's schedule (None: delivered unbooked), with one
        book call per merchant, all in one round trip."""
        groups: dict[tuple[str, Decimal], list[int]] = {}
        for index, handover in enumerate(batch):
            if handover.books_a_slot:
                groups.setdefault((handover.merchant_id, handover.rate_limit), []).append(index)
        slots: list[_Slot | None] = [None] * len(batch)
        if groups:
            if self._limiter is None:
                self._limiter = RateLimiter(self._client)
            bookings = await self._limiter.book_many(
                [(merchant_id, rate_limit, len(indexes)) for (merchant_id, rate_limit), indexes in groups.items()])
            for indexes, booking in zip(groups.values(), bookings):
                for index, slot_ms in zip(indexes, booking.slots_ms):
                    slots[index] = _Slot(slot_ms, booking.now_ms)
        return slots


def enqueue_script_call(broker: RedisBroker, message: Message, timestamp_ms: int) -> tuple[list[str], list]:
    """The keys and arguments with which ``RedisBroker.enqueue`` runs dramatiq's ``dispatch``
    script for ``message`` (which carries its ``redis_message_id``), so that a pipelined write
    stores exactly what dramatiq would.

    This is dramatiq's internal calling convention, not its public API: the dependency is pinned
    to the releases it holds for, and tests/refunds/test_dramatiq_contract.py compares it with what
    ``RedisBroker.enqueue`` really passes. The order: command, timestamp, queue, broker id,
    heartbeat timeout, dead message TTL, do maintenance (no: workers do it), max unpack size
    (read only by maintenance and fetch), then the command's own: message id and data.
    """
    return [broker.namespace], [
        "enqueue", timestamp_ms, message.queue_name, broker.broker_id, broker.heartbeat_timeout,
        broker.dead_message_ttl, 0, 0, message.options["redis_message_id"], message.encode(),
    ]


def _messages(refund_ids: list[str], slots: list["_Slot | None"]) -> list[Message]:
    """The messages for refunds handed over together.

    A refund whose slot lies ahead gets a message of its own in the delay queue (what
    ``RedisBroker.enqueue(message, delay=d)`` writes: the delay queue, and an eta, here
    the slot itself). The slot is on Redis's clock and the eta is read against the clock
    of the worker that holds the message (dramatiq's current_millis), like the eta enqueue
    writes from the producer's clock: one machine, or NTP-close; a skew only moves the
    arrival, and the window the worker checks at send time keeps the limit.

    Refunds due now share ``send_refunds`` messages of up to ``REFUND_PACK_SIZE`` refunds:
    a worker carries them together (one fetch and one ack, their statements shared), which
    is how many refunds are in flight per worker thread.
    """
    pack_size = get_settings().refund_pack_size
    due: list[tuple[str, int | None]] = []
    messages: list[Message] = []
    for refund_id, slot in zip(refund_ids, slots, strict=True):
        slot_ms = None if slot is None else slot.slot_ms
        if slot is not None and slot.ahead_ms > 0:
            messages.append(send_refund_message(refund_id, slot_ms=slot_ms).copy(
                queue_name=dq_name(QUEUE), options={"eta": slot_ms}))
        else:
            due.append((refund_id, slot_ms))
    for start in range(0, len(due), pack_size):
        pack = due[start:start + pack_size]
        if len(pack) == 1:
            messages.append(send_refund_message(pack[0][0], slot_ms=pack[0][1]))
        else:
            messages.append(Message(queue_name=QUEUE, actor_name=SEND_REFUNDS,
                                    args=([list(item) for item in pack],), kwargs={}, options={}))
    return messages


async def _record_slots(booked: list[tuple[_Handover, _Slot]]) -> None:
    """delivered_at = slot for refunds booked far ahead, one statement per pool (one pool, as a rule).

    A failure only logs: the outbox sweep may then deliver such a refund again before its
    slot, and the worker's claim makes that duplicate harmless.
    """
    by_pool: dict[int, tuple[asyncpg.Pool | asyncpg.Connection, list[str], list[datetime]]] = {}
    for handover, slot in booked:
        _, ids, times = by_pool.setdefault(id(handover.pool), (handover.pool, [], []))
        ids.append(handover.refund_id)
        times.append(_EPOCH + timedelta(milliseconds=slot.slot_ms))
    for pool, ids, times in by_pool.values():
        try:
            await pool.execute(_RECORD_SLOTS, ids, times)
        except Exception as exc:
            log.warning("delivered_at of %d refunds booked ahead not recorded (%s); the outbox sweep may"
                        " deliver them early, harmlessly", len(ids), type(exc).__name__)


async def deliver_async(
    refund_id: UUID | str, *, merchant_id: str | None = None, rate_limit: Decimal | None = None,
    pool: asyncpg.Pool | asyncpg.Connection | None = None, courier: Courier | None = None,
) -> bool:
    """``deliver`` from an event loop: through ``courier`` (``Courier.deliver``), or, for a caller
    handing over one refund now and then, a courier of its own for this refund."""
    if courier is not None:
        return await courier.deliver(refund_id, merchant_id=merchant_id, rate_limit=rate_limit, pool=pool)
    async with Courier() as own:
        return await own.deliver(refund_id, merchant_id=merchant_id, rate_limit=rate_limit, pool=pool)
