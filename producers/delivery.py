"""Hand accepted refunds to the workers through Redis (dramatiq messages).

Redis is only a delivery channel: a refund is in Postgres before its message exists,
and the scheduler's outbox sweep re-delivers any refund whose message was lost.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from uuid import UUID

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from refunds.settings import get_settings

QUEUE = "refunds"
SEND_REFUND = "send_refund"

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def producer_broker() -> RedisBroker:
    """A broker used only to enqueue (no middleware: workers own retries and limits)."""
    return RedisBroker(
        url=get_settings().require("redis_url"), middleware=[], socket_connect_timeout=2, socket_timeout=5,
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
