"""Producers: every door through which a refund request enters (Python, HTTP, CLI, CSV).

``enqueue_refund(pool, ...)`` for async code, ``enqueue_refund_sync(...)`` or a
``RefundProducer`` for synchronous code; all of them validate and de-duplicate alike.
"""

from .enqueue import EnqueueResult, RefundRequest, enqueue_refund
from .sync import RefundProducer, enqueue_refund_sync

__all__ = ["EnqueueResult", "RefundProducer", "RefundRequest", "enqueue_refund", "enqueue_refund_sync"]
