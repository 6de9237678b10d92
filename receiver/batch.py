"""cip.paid notifications that arrive together are stored with one statement.

Most notifications are ``cip.paid`` (every order is a payment; few are refunded), and what
each one costs is mostly not its own work but the round trips around it: taking a pooled
connection, the statement, and the pool's reset when it is given back. So concurrent
``cip.paid`` notifications share them: each request puts its notification in a queue, and
up to ``max_inflight`` flushes run at a time, each taking everything queued (up to
``max_batch``) into one statement (``events.store_payments``). When the receiver is idle a
notification is flushed at once, alone: nothing waits for a batch to fill.

Each notification keeps its own answer. A batch never holds the same notification or the
same payment twice (those wait for the next batch, where they are an ordinary duplicate or
"already"), so one statement decides each of them exactly as it would alone. If Postgres
refuses a body, the batch is stored again one by one so that only that notification gets
its 400; if Postgres is unreachable, every notification of the batch gets 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import asyncpg

from refunds.database import Database, Unavailable

from . import events

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    merchant_id: str
    note: events.Notification
    future: asyncio.Future = field(repr=False)

    @property
    def keys(self) -> tuple[tuple, tuple]:
        return (self.merchant_id, self.note.operation_number), (self.merchant_id, self.note.event.cip)


class PaymentBatcher:
    def __init__(self, database: Database, *, max_batch: int = 100, max_inflight: int = 4):
        self._database = database
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: deque[_Waiting] = deque()
        self._flushes: set[asyncio.Task] = set()

    async def store(self, merchant_id: str, note: events.Notification) -> events.Outcome:
        """Store and apply one cip.paid notification (with others arriving meanwhile).

        Raises ``Unavailable`` (503) or ``events.Malformed`` (400) like ``events.store_and_apply``.
        """
        waiting = _Waiting(merchant_id, note, asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        if len(self._flushes) < self._max_inflight:
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await waiting.future

    async def _flush(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                await self._store(batch)
            except Unavailable as exc:
                for waiting in batch:
                    _fail(waiting, exc)
            except Exception as exc:  # a bug: those requests fail (500), the receiver goes on
                log.exception("storing a batch of %d cip.paid notifications failed", len(batch))
                for waiting in batch:
                    _fail(waiting, exc)
            except BaseException:  # cancelled at shutdown: the sender will deliver again
                for waiting in batch:
                    _fail(waiting, Unavailable("the receiver is shutting down"))
                raise

    def _take(self) -> list[_Waiting]:
        batch, held, seen = [], [], set()
        while self._queue and len(batch) < self._max_batch:
            waiting = self._queue.popleft()
            if waiting.future.done():  # its request is gone (cancelled); nothing to store for it
                continue
            if seen.intersection(waiting.keys):
                held.append(waiting)  # same notification or same payment: the next batch
                continue
            seen.update(waiting.keys)
            batch.append(waiting)
        self._queue.extendleft(reversed(held))
        return batch

    async def _store(self, batch: list[_Waiting]) -> None:
        if not batch:
            return
        async with self._database.connection() as conn:
            try:
                outcomes = await events.store_payments(conn, [(w.merchant_id, w.note) for w in batch])
            except asyncpg.DataError:
                if len(batch) == 1:
                    _fail(batch[0], _malformed(batch[0]))
                    return
                outcomes = []
                for waiting in batch:  # find the body Postgres refuses; the others are stored
                    try:
                        [outcome] = await events.store_payments(conn, [(waiting.merchant_id, waiting.note)])
                    except asyncpg.DataError:
                        outcome = _malformed(waiting)
                    outcomes.append(outcome)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                _fail(waiting, outcome)
            elif not waiting.future.done():
                waiting.future.set_result(outcome)


def _malformed(waiting: _Waiting) -> events.Malformed:
    return events.Malformed("body cannot be stored: Postgres refuses a value in it", waiting.note.event_type)


def _fail(waiting: _Waiting, exc: Exception) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(exc)
