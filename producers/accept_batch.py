"""Intake requests awaited together are accepted with one shared statement.

The accepting statement and the pooled connection around it are the intake's main cost in
Postgres, so concurrent requests share them: each request queues its ``Ask`` and awaits its
own answer (``refunds.coalesce.Coalescer``); up to ``max_inflight`` flushes run at a time,
each taking what is queued (up to ``max_batch``) into one ``_ACCEPT_MANY`` with one row per
request. When the intake is idle a request is accepted at once, alone, by the single-row
path: nothing waits for a batch to fill.

Each request keeps the answer it would get alone. A batch never holds two requests with the
same external_ref nor two for the same payment (those wait for the next batch), so each
row's verdict from the statement's snapshot is its verdict alone. If Postgres fails the
statement as a whole (the CHECK refusing a refund because another transaction used the
payment meanwhile, a deadlock, a value it refuses), the coalescer accepts each request alone,
so that only the request really refused gets its error. An outage fails every request of
the batch alike (503).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import asyncpg

from refunds.coalesce import Coalescer

from . import enqueue
from .enqueue import Ask, EnqueueResult

# What makes Postgres undo the whole statement for one row's sake: each request is accepted alone.
WHOLE_BATCH_ERRORS = (
    asyncpg.IntegrityConstraintViolationError,  # the CHECK on refunded_amount, a unique violation
    asyncpg.DataError,                          # a value Postgres refuses
    asyncpg.exceptions.TransactionRollbackError,  # a deadlock with another batch
)

Outcome = EnqueueResult | Exception


class AcceptBatcher:
    """``await batcher.accept(ask)``: accepts ``ask`` together with the requests awaited meanwhile.

    ``connection()`` gives a pooled connection as an async context manager
    (``refunds.database.Database.connection``: outages there become ``Unavailable``).
    """

    def __init__(self, connection: Callable[[], AbstractAsyncContextManager[asyncpg.Connection]], *,
                 max_batch: int = 64, max_inflight: int = 4):
        self._connection = connection
        self._coalescer: Coalescer[Ask, Outcome] = Coalescer(
            self._accept_many, keys=_keys, max_batch=max_batch, max_inflight=max_inflight,
            alone_on=WHOLE_BATCH_ERRORS, name="refund requests",
        )

    async def accept(self, ask: Ask) -> EnqueueResult:
        """The answer alone: the result, or the error (RefundRefused, IdempotencyConflict, TokenRevoked)."""
        outcome = await self._coalescer(ask)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _accept_many(self, asks: list[Ask]) -> list[Outcome]:
        async with self._connection() as conn:
            if len(asks) == 1:
                return [await _outcome(enqueue.accept_alone(conn, asks[0]))]
            rows = await enqueue.run_accept(conn, asks)  # WHOLE_BATCH_ERRORS: each alone (the coalescer)
            return [await _outcome(enqueue.judge(conn, ask.request, row)) for ask, row in zip(asks, rows, strict=True)]


def _keys(ask: Ask) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Its external_ref and its payment: a batch holds one request for each."""
    request = ask.request
    return ("ref", request.merchant_id, request.external_ref), ("payment", request.merchant_id,
                                                                 request.original_transaction_id)


async def _outcome(answer) -> Outcome:
    """One request's answer, an error included, so that it fails alone."""
    try:
        return await answer
    except Exception as exc:
        return exc
