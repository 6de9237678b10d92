"""Hand accepted refunds to the workers through Redis (dramatiq messages).

Redis is only a delivery channel: a refund is in Postgres before its message exists,
and the scheduler's outbox sweep re-delivers any refund whose message was lost. A
message sent twice is harmless: the worker's claim on the refund decides.

``deliver`` is the blocking form (workers, scheduler, scripts): dramatiq's own
``RedisBroker.enqueue``. ``deliver_async`` is for producers on an event loop, where a
worker-thread hop per refund cost more CPU than the rest of the intake's work: it
gathers the refunds handed over at the same moment and sends them in one pipelined
write on an asyncio Redis client, running dramatiq's own ``dispatch`` Lua script with
the arguments ``RedisBroker.enqueue`` gives it (tests/test_producers.py checks that a
dramatiq consumer reads these messages exactly as its own). If that ever fails for
another reason than Redis being away, it falls back to ``deliver``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from functools import lru_cache
from uuid import UUID

import redis
import redis.asyncio as aioredis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from refunds.settings import get_settings

QUEUE = "refunds"
SEND_REFUND = "send_refund"
MAX_BATCH = 256  # refunds per pipelined write
CONNECT_TIMEOUT, SOCKET_TIMEOUT = 2, 5
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, OSError, TimeoutError)

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def producer_broker() -> RedisBroker:
    """A broker used only to enqueue (no middleware: workers own retries and limits)."""
    return RedisBroker(
        url=get_settings().require("redis_url"), middleware=[], socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=SOCKET_TIMEOUT,
    )


def send_refund_message(refund_id: UUID | str, *, delay_ms: int | None = None) -> Message:
    return Message(
        queue_name=QUEUE, actor_name=SEND_REFUND, args=(str(refund_id),), kwargs={}, options={},
    )


def deliver(refund_id: UUID | str, *, delay_ms: int | None = None) -> bool:
    """Enqueue one send_refund message; False (and a log line) if Redis is unreachable."""
    try:
        producer_broker().enqueue(send_refund_message(refund_id), delay=delay_ms)
        return True
    except Exception as exc:  # the outbox sweep will deliver it later
        log.warning("delivery of refund %s postponed: %s", refund_id, type(exc).__name__)
        return False


def deliver_many(refund_ids: list[UUID | str]) -> list[bool]:
    """``deliver`` in order; after the first failure the rest are postponed at once
    (one Redis timeout per batch, not one per refund)."""
    results: list[bool] = []
    ok = True
    for refund_id in refund_ids:
        ok = ok and deliver(refund_id)
        results.append(ok)
    return results


class _Courier:
    """One per event loop: its Redis client, and the refunds waiting for the next write."""

    def __init__(self) -> None:
        self._waiting: list[tuple[str, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._broker: RedisBroker | None = None  # the producer broker the client was made for
        self._client: aioredis.Redis | None = None
        self._dispatch = None
        self._closer: asyncio.Task | None = None

    def deliver(self, refund_id: UUID | str) -> asyncio.Future:
        loop = asyncio.get_running_loop()  # not kept: the courier must not keep its loop alive
        future = loop.create_future()
        self._waiting.append((str(refund_id), future))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                ids = [refund_id for refund_id, _ in batch]
                try:
                    await self._send(ids)
                    results = [True] * len(ids)
                except REDIS_AWAY as exc:
                    log.warning("delivery of %d refunds postponed: %s", len(ids), type(exc).__name__)
                    results = [False] * len(ids)
                except Exception as exc:
                    log.warning("pipelined delivery failed (%s); delivering one by one", type(exc).__name__)
                    results = await asyncio.to_thread(deliver_many, ids)
                except BaseException:  # cancelled: the loop is closing; the outbox sweep has them
                    for _, future in batch:
                        if not future.done():
                            future.set_result(False)
                    raise
                for (_, future), ok in zip(batch, results):
                    if not future.done():
                        future.set_result(ok)
        finally:
            self._task = None

    async def _send(self, refund_ids: list[str]) -> None:
        """What ``RedisBroker.enqueue`` does for each message, in one pipelined write."""
        broker = producer_broker()
        if self._broker is not broker:  # first use, or REDIS_URL changed (tests do)
            await self._close()
            self._client = aioredis.Redis.from_url(
                get_settings().require("redis_url"), socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
            )
            self._dispatch = self._client.register_script(broker.scripts["dispatch"].script)
            self._broker = broker
            if self._closer is None:
                self._closer = asyncio.get_running_loop().create_task(self._close_with_loop())
        pipe = self._client.pipeline(transaction=False)
        timestamp = int(time.time() * 1000)
        for refund_id in refund_ids:
            message = send_refund_message(refund_id).copy(options={"redis_message_id": str(uuid.uuid4())})
            # RedisBroker._dispatch's arguments: command, timestamp, queue, broker id, heartbeat
            # timeout, dead message TTL, maintenance (workers do it), max unpack size (only
            # read by maintenance and fetch), then the command's own: message id and data.
            await self._dispatch(keys=[broker.namespace], args=[
                "enqueue", timestamp, QUEUE, broker.broker_id, broker.heartbeat_timeout, broker.dead_message_ttl,
                0, 0, message.options["redis_message_id"], message.encode(),
            ], client=pipe)
        await pipe.execute()

    async def _close_with_loop(self) -> None:
        """Wait for the loop's end (its tasks are cancelled then) and close the client on it."""
        try:
            await asyncio.Event().wait()
        finally:
            self._closer = None  # nothing here refers to the loop any more
            await self._close()

    async def _close(self) -> None:
        client, self._client, self._broker = self._client, None, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing a client whose server is gone
                pass


_couriers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Courier]" = weakref.WeakKeyDictionary()


async def deliver_async(refund_id: UUID | str) -> bool:
    """``deliver`` from an event loop, batched with the other deliveries of the moment."""
    loop = asyncio.get_running_loop()
    courier = _couriers.get(loop)
    if courier is None:
        courier = _couriers[loop] = _Courier()
    return await asyncio.shield(courier.deliver(refund_id))
