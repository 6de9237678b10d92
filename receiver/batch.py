"""Notifications of one kind that arrive together are stored with shared statements.

What a notification costs is mostly not its own work but the round trips around it: taking a
pooled connection, the statements, and the pool's reset when it is given back (and Postgres'
own work per statement). So concurrent notifications of one kind share them: each request
puts its notification in its kind's queue, and up to ``max_inflight`` flushes per kind run at
a time, each taking everything queued (up to ``max_batch``) into one call of that kind's
statements on one connection: ``cip.paid`` with one statement (``events.store_payments``),
refund outcomes with one read and one statement (``events.store_refund_outcomes``). When the
receiver is idle a notification is flushed at once, alone: nothing waits for a batch to fill.

Each notification keeps its own answer. A batch never holds the same notification twice, nor
two about the same payment or the same refund (those wait for the next batch, where they are
an ordinary duplicate, "already" or "late"), so the shared statements decide each of them
exactly as they would alone. If Postgres refuses a body, or two batches deadlock anyway
(through the payment rows a refund's move updates), each notification of the batch Postgres
undid is stored alone, so that only a body it refuses gets its 400; if Postgres is
unreachable, every notification of the batch gets 503.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from refunds.coalesce import Coalescer
from refunds.database import Database, Unavailable

from . import events

log = logging.getLogger(__name__)

_Note = tuple[str, events.Notification]  # (merchant_id, notification)
# A body Postgres refuses, or a deadlock with another batch (through the payment rows a refund's
# move updates): Postgres undoes the whole statement, so each notification is stored alone.
ALONE_ON = (asyncpg.DataError, asyncpg.DeadlockDetectedError)


class NotificationBatcher:
    """Stores notifications of one kind in batches: a subclass says which (``kind``), what each
    is about (``subject``: no two in a batch share it) and how a batch is stored (``store_many``).
    The queueing, holding and flushing are ``refunds.coalesce.Coalescer``'s."""

    kind = "notifications"

    def __init__(self, database: Database, *, max_batch: int = 100, max_inflight: int = 4):
        self._database = database
        self._coalescer: Coalescer[_Note, events.Outcome | events.Malformed] = Coalescer(
            self._store, keys=self._keys, max_batch=max_batch, max_inflight=max_inflight,
            alone_on=ALONE_ON, name=f"{self.kind} notifications")

    def subject(self, event) -> tuple[str, str]:
        """What the notification is about (a payment, a refund): a batch holds one notification about it."""
        raise NotImplementedError

    async def store_many(self, conn: asyncpg.Connection,
                         notes: list[tuple[str, events.Notification]]) -> list[events.Outcome]:
        raise NotImplementedError

    async def store(self, merchant_id: str, note: events.Notification) -> events.Outcome:
        """Store and apply one notification (with others arriving meanwhile).

        Raises ``Unavailable`` (503) or ``events.Malformed`` (400) like ``events.store_and_apply``.
        """
        try:
            outcome = await self._coalescer((merchant_id, note))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this request itself is cancelled
            raise Unavailable("the receiver is shutting down") from None  # its batch was, at shutdown
        if isinstance(outcome, events.Malformed):
            raise outcome
        return outcome

    def _keys(self, item: _Note) -> tuple[tuple, tuple]:
        merchant_id, note = item
        return (merchant_id, "notification", note.operation_number), (merchant_id, *self.subject(note.event))

    async def _store(self, batch: list[_Note]) -> list[events.Outcome | events.Malformed]:
        try:
            async with self._database.connection() as conn:
                try:
                    return await self.store_many(conn, batch)
                except ALONE_ON as exc:
                    if isinstance(exc, asyncpg.DataError) and len(batch) == 1:
                        return [_malformed(batch[0])]
                    undone = exc  # raised outside the block, which takes a deadlock for an outage
            raise undone  # the coalescer stores each alone: only a body Postgres refuses gets its 400
        except (Unavailable, *ALONE_ON):
            raise
        except Exception:  # a bug: those requests fail (500), the receiver goes on
            log.exception("storing a batch of %d %s notifications failed", len(batch), self.kind)
            raise


class PaymentBatcher(NotificationBatcher):
    """``cip.paid``: one statement a batch."""

    kind = "cip.paid"

    def subject(self, event: events.CipPaid) -> tuple[str, str]:
        return "payment", event.cip

    async def store_many(self, conn, notes):
        return await events.store_payments(conn, notes)


class RefundOutcomeBatcher(NotificationBatcher):
    """``refund.succeeded`` / ``refund.failed``: one read and one statement a batch."""

    kind = "refund outcome"

    def subject(self, event: events.RefundOutcome) -> tuple[str, str]:
        return "refund", event.external_ref  # a refund is one externalRef of one merchant

    async def store_many(self, conn, notes):
        return await events.store_refund_outcomes(conn, notes)


def _malformed(item: _Note) -> events.Malformed:
    return events.Malformed("body cannot be stored: Postgres refuses a value in it", item[1].event_type)
