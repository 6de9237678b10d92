"""The dramatiq actors. Thin: each runs one coroutine on the worker's event loop."""

from __future__ import annotations

from uuid import UUID

import dramatiq

from refunds.delivery import QUEUE, SEND_REFUND, SEND_REFUNDS

from . import resources
from .sender import process_refund, process_refunds

# Delayed retries for long outages (RetryLater, or Postgres/Redis unreachable):
# exponential backoff with jitter from 1 s up to 1 h, 60 times, which spans over 24 hours.
# A rate-limit wait re-queues a new message instead, so it never uses this budget.


@dramatiq.actor(
    actor_name=SEND_REFUND, queue_name=QUEUE, time_limit=60_000,
    max_retries=60, min_backoff=1_000, max_backoff=3_600_000,
)
async def send_refund(refund_id: str, slot_ms: int | None = None) -> None:
    await process_refund(resources.current(), UUID(refund_id), slot_ms)


@dramatiq.actor(
    actor_name=SEND_REFUNDS, queue_name=QUEUE, time_limit=60_000,
    max_retries=60, min_backoff=1_000, max_backoff=3_600_000,
)
async def send_refunds(items: list[list]) -> None:
    """Refunds handed over together: ``[[refund_id, slot_ms or None], ...]``."""
    await process_refunds(resources.current(), [(UUID(refund_id), slot_ms) for refund_id, slot_ms in items])
