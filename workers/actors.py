"""The dramatiq actors. Thin: each runs one coroutine on the worker's event loop."""

from __future__ import annotations

from uuid import UUID

import dramatiq

from refunds.delivery import DELIVER_WEBHOOK, QUEUE, SEND_REFUND, SEND_REFUNDS, WEBHOOKS_QUEUE
from refunds.webhooks import parse_networks

from . import resources
from .retries import ACTOR_RETRIES
from .sender import process_refund, process_refunds
from .webhooks import deliver_in_turn

# dramatiq retries a message whose actor raised (Postgres or Redis unreachable); a rate-limit
# wait or a RetryLater re-queues a new message instead (the policy: workers.retries).


@dramatiq.actor(actor_name=SEND_REFUND, queue_name=QUEUE, time_limit=60_000, **ACTOR_RETRIES)
async def send_refund(refund_id: str, slot_ms: int | None = None) -> None:
    await process_refund(resources.current(), UUID(refund_id), slot_ms)


@dramatiq.actor(actor_name=SEND_REFUNDS, queue_name=QUEUE, time_limit=60_000, **ACTOR_RETRIES)
async def send_refunds(items: list[list]) -> None:
    """Refunds handed over together: ``[[refund_id, slot_ms or None], ...]``."""
    await process_refunds(resources.current(), [(UUID(refund_id), slot_ms) for refund_id, slot_ms in items])


@dramatiq.actor(actor_name=DELIVER_WEBHOOK, queue_name=WEBHOOKS_QUEUE, time_limit=60_000, max_retries=3)
async def deliver_webhook(event_id: str, endpoint_id: str) -> None:
    """One webhook delivery the scheduler leased (refunds.webhooks); its retries are its own
    schedule, not dramatiq's: a message that raises goes again when its lease runs out."""
    res = resources.current()
    await deliver_in_turn(res.pool, res.webhook_session, res.vault, event_id, UUID(endpoint_id),
                          allowed_networks=parse_networks(res.settings.webhook_allowed_networks),
                          lease_seconds=res.settings.webhook_lease_seconds)
